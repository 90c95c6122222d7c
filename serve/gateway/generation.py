"""One request's trip through a replica: the `Shard.Generate` stream in, text
pieces out (detokenized, stop strings applied), with usage and timing at the end."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from shardwire.v1 import inference_pb2, shard_pb2

from serve.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ShardwireError,
    Unavailable,
)
from serve.gateway.admission import AdmittedRequest
from serve.gateway.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve.gateway.migration import Flight
from serve.gateway.record import RequestRecord
from serve.gateway.router import FailoverCall, Lease, ReplicaClient, Router
from serve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_FINISH_FROM_PROTO = {
    inference_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    inference_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    inference_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}
_ERRORS_FROM_REPLICA: dict[grpc.StatusCode, type[ShardwireError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class Timing:
    queue_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class OutputChunk:
    """Text and token ids produced since the previous chunk; the last one is finished."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timing: Timing | None = None


def shard_request(
    admitted: AdmittedRequest, stop_token_ids: tuple[int, ...]
) -> shard_pb2.ShardGenerateRequest:
    s = admitted.sampling
    sampling = inference_pb2.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        ignore_eos=s.ignore_eos,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    return shard_pb2.ShardGenerateRequest(
        request_id=admitted.request_id,
        prompt_token_ids=admitted.prompt_token_ids,
        sampling=sampling,
        stop_token_ids=stop_token_ids,
    )


class Generation:
    """Runs admitted requests on replicas and turns their token ids into text."""

    def __init__(self, tokenizer: Tokenizer, router: Router) -> None:
        self._tokenizer = tokenizer
        self._router = router

    def _extra_stop_ids(self, replica: ReplicaClient, ignore_eos: bool) -> tuple[int, ...]:
        """EOS ids the tokenizer knows but the replica may not."""
        if ignore_eos or replica.status is None:
            return ()
        known = set(replica.status.eos_token_ids)
        return tuple(i for i in self._tokenizer.eos_token_ids if i not in known)

    async def run(
        self,
        replica: ReplicaClient,
        admitted: AdmittedRequest,
        *,
        record: RequestRecord,
        timeout_s: float | None,
        session_id: str = "",
    ) -> AsyncIterator[OutputChunk]:
        """Streams the request's output, counting tokens and clocks into `record`.
        The request may change replica on the way (failover before the first token,
        hand-over after a prefill replica's first token, live migration): the client
        sees one stream."""
        rid = admitted.request_id
        num_prompt = len(admitted.prompt_token_ids)
        max_tokens = admitted.sampling.max_tokens or 0
        extra_stop_ids = self._extra_stop_ids(replica, admitted.sampling.ignore_eos)
        request = shard_request(admitted, extra_stop_ids)
        detokenizer = IncrementalDetokenizer(self._tokenizer)
        stops = StopStringMatcher(admitted.sampling.stop)
        record.admitted(replica.address, num_prompt)
        flight = Flight(rid, replica)
        self._plan_kv(request, replica, flight, session_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        call = replica.generate(request, timeout_s)
        flight.call = call
        logger.debug("[%s] sent to %s: %d prompt tokens", rid, replica.address, num_prompt)
        with (
            self._router.track(replica, num_prompt + max_tokens) as lease,
            self._router.track_flight(flight),
        ):
            try:
                async for msg, ids in _upstream(call, flight, lease, record, deadline):
                    if ids and record.first_token_at is None:
                        lease.consume(num_prompt)
                    lease.consume(len(ids))
                    record.add(
                        len(ids),
                        prompt_tokens=msg.prompt_tokens,
                        cached_prompt_tokens=msg.cached_prompt_tokens,
                        queue_s=msg.queue_s,
                    )
                    finish = _FINISH_FROM_PROTO.get(msg.finish_reason)
                    text = detokenizer.step(ids)
                    if finish is not None:
                        text += detokenizer.flush()
                    text = stops.push(text)
                    if stops.is_stopped:
                        flight.cancel()  # aborts the request on the replica, freeing its KV
                        yield _finished(record, text, ids, FinishReason.STOP)
                        return
                    if finish is not None:
                        yield _finished(record, text + stops.flush(), ids, finish)
                        return
                    if text or ids:
                        yield OutputChunk(text, ids)
                logger.warning("[%s] replica stream ended without a finish reason", rid)
                text = stops.push(detokenizer.flush()) + stops.flush()
                yield _finished(record, text, (), FinishReason.ABORT)
            except grpc.aio.AioRpcError as err:
                raise _replica_error(err, flight.replica, rid) from err
            finally:
                flight.cancel()
                flight.forget_handover()

    def _plan_kv(
        self,
        request: shard_pb2.ShardGenerateRequest,
        replica: ReplicaClient,
        flight: Flight,
        session_id: str,
    ) -> None:
        """KV moves the request starts with: a prefill replica hands it over to a
        decode replica after its first token; a replica without the session's
        dialogue prefix may fetch it from the one that served the last turn (without
        a session: from the one that probably holds more of the prompt's prefix)."""
        router = self._router
        request.kv_codec = router.kv_codec
        if replica.status is not None and replica.status.role == "prefill":
            target = router.decode_target({replica.address})
            if target is not None:
                request.handoff_target = target.address
                flight.prefill_handover = flight.expect_handover(target)
        bound = router.replica(router.bound_replica(session_id))
        if bound is not None and bound is not replica and bound.is_healthy:
            request.prefix_source = bound.address  # cordoned replicas still answer
        elif bound is None:
            request.prefix_source = router.prefix_source(request.prompt_token_ids, replica)
        # The replica will hold the prompt's KV: later prompts sharing its prefix may
        # follow it there, before this one finished.
        router.remember(replica.address, request.prompt_token_ids)


async def _upstream(
    call: FailoverCall,
    flight: Flight,
    lease: Lease,
    record: RequestRecord,
    deadline: float | None,
) -> AsyncIterator[tuple[shard_pb2.ShardGenerateChunk, tuple[int, ...]]]:
    """The replica stream of one request, with its new token ids; on a hand-over
    (`migrated`) it continues with `Shard.Resume` on the target. Token ids are
    deduplicated by their index (chunks count the request's output tokens)."""
    rid = flight.request_id
    stream: FailoverCall | grpc.aio.UnaryStreamCall = call
    resumed_at: float | None = None
    while True:
        migrated = False
        async for msg in stream:
            if isinstance(stream, FailoverCall) and stream.replica is not flight.replica:
                lease.move_to(stream.replica)  # moved on failover: so does its load
                flight.replica = stream.replica
            record.replica = flight.replica.address
            ids = _fresh_ids(msg, flight)
            if ids:
                now = time.monotonic()
                if resumed_at is not None and flight.last_token_at is not None:
                    pause = now - flight.last_token_at
                    flight.pauses_s.append(pause)
                    logger.info(
                        "[%s] resumed on %s: %.1f ms from the last token on the source "
                        "(%.1f ms waiting for Resume)",
                        rid,
                        flight.replica.address,
                        pause * 1e3,
                        (now - resumed_at) * 1e3,
                    )
                    resumed_at = None
                flight.last_token_at = now
            migrated = migrated or msg.migrated
            flight.saw_output(msg.num_output_tokens, msg.migrated)
            yield msg, ids
        if not migrated:
            return
        target = await flight.handover_target()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        stream = target.resume(rid, remaining)
        flight.call = stream
        resumed_at = time.monotonic()
        lease.move_to(target)
        flight.replica = target
        record.replica = target.address


def _fresh_ids(msg: shard_pb2.ShardGenerateChunk, flight: Flight) -> tuple[int, ...]:
    """The chunk's token ids the client has not had yet."""
    ids = tuple(msg.token_ids)
    if msg.num_output_tokens:
        first = msg.num_output_tokens - len(ids)
        if first > flight.num_delivered:
            raise Unavailable(
                f"tokens {flight.num_delivered}..{first} of the request were lost on the way"
            )
        ids = ids[flight.num_delivered - first :]
    flight.num_delivered += len(ids)
    return ids


def _finished(
    record: RequestRecord, text: str, ids: tuple[int, ...], reason: FinishReason
) -> OutputChunk:
    """The stream's last chunk, with the usage and timing the client sees."""
    record.finish(reason.value)
    usage = Usage(record.prompt_tokens, record.completion_tokens, record.cached_prompt_tokens)
    ttft = record.time_to_first_token_s
    total = record.total_s
    timing = Timing(record.queue_s, total if ttft is None else ttft, total)
    return OutputChunk(text, ids, reason, usage, timing)


def _replica_error(err: grpc.aio.AioRpcError, replica: ReplicaClient, rid: str) -> ShardwireError:
    code = err.code()
    logger.warning("[%s] replica %s failed: %s: %s", rid, replica.address, code.name, err.details())
    if code is grpc.StatusCode.UNAVAILABLE:
        replica.mark_unhealthy(err.details() or "unavailable")
    error_type = _ERRORS_FROM_REPLICA.get(code)
    if error_type is not None:
        return error_type(err.details() or code.name.lower())
    return ShardwireError(f"replica failed: {code.name}: {err.details()}")
