"""One request's trip through a replica: the `Shard.Generate` stream in, text
pieces out (detokenized, stop strings applied), with usage and timing at the end."""

from __future__ import annotations

import enum
import logging
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
from serve.gateway.record import RequestRecord
from serve.gateway.router import ReplicaClient, Router
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
    ) -> AsyncIterator[OutputChunk]:
        """Streams the request's output, counting tokens and clocks into `record`."""
        rid = admitted.request_id
        num_prompt = len(admitted.prompt_token_ids)
        max_tokens = admitted.sampling.max_tokens or 0
        extra_stop_ids = self._extra_stop_ids(replica, admitted.sampling.ignore_eos)
        request = shard_request(admitted, extra_stop_ids)
        detokenizer = IncrementalDetokenizer(self._tokenizer)
        stops = StopStringMatcher(admitted.sampling.stop)
        record.admitted(replica.address, num_prompt)
        call = replica.generate(request, timeout_s)
        logger.debug("[%s] sent to %s: %d prompt tokens", rid, replica.address, num_prompt)
        with self._router.track(replica, num_prompt + max_tokens) as lease:
            try:
                async for msg in call:
                    record.replica = call.replica.address  # moves on failover
                    ids = tuple(msg.token_ids)
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
                        call.cancel()  # aborts the request on the replica, freeing its KV
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
                raise _replica_error(err, replica, rid) from err
            finally:
                call.cancel()


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
