"""Shard gRPC servicer: protobuf -> engine call -> protobuf, nothing more.

The gateway validates what clients send; a leader checks again what reaches it
(a caller may skip the gateway): ids, counts and ranges, cheapest checks first,
before the engine sees the request."""

from __future__ import annotations

import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator

import grpc
from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from serve.engine.engine import AsyncEngine
from serve.engine.request import FinishReason, RequestOutput, SamplingParams
from serve.errors import InvalidArgument
from serve.gateway.interceptor import current_request_id
from serve.shard.kv_transfer import KvTransfer

logger = logging.getLogger(__name__)

# Longest request id kept (it names the request in logs and in Abort).
MAX_REQUEST_ID_CHARS = 256
# Extra stop tokens one request may name.
MAX_STOP_TOKEN_IDS = 256

FINISH_TO_PROTO = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
    FinishReason.MIGRATED: inference_pb2.FINISH_REASON_UNSPECIFIED,
}
ROLES = ("both", "prefill", "decode")


def sampling_from_proto(
    sp: inference_pb2.SamplingParams, stop_token_ids: list[int]
) -> SamplingParams:
    """Engine sampling parameters; the gateway has validated ranges already,
    this guards the replica against a caller that skipped it."""
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else 16
    temperature = sp.temperature if sp.HasField("temperature") else 1.0
    top_p = sp.top_p if sp.HasField("top_p") else 1.0
    if max_tokens < 1:
        raise InvalidArgument("sampling.max_tokens must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InvalidArgument("sampling.temperature must be a finite number >= 0")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument("sampling.top_p must be in (0, 1]")
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(
            f"stop_token_ids has {len(stop_token_ids)} ids, at most {MAX_STOP_TOKEN_IDS} allowed"
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=sp.top_k,
        seed=sp.seed if sp.HasField("seed") else None,
        ignore_eos=sp.ignore_eos,
        stop_token_ids=tuple(stop_token_ids),
    )


class ShardServicer(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        dtype: str,
        tp_size: int = 1,
        *,
        kv: KvTransfer | None = None,
        role: str = "both",
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.dtype = dtype
        self.tp_size = tp_size
        # KV moves to and from other replicas; `role` is what the gateway sends here.
        self.kv = kv or KvTransfer(engine, grpc.aio.insecure_channel)
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        # Set when the leader drains (SIGTERM): gateways move its requests away.
        self.draining = False

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: shard_pb2.ShardGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ShardGenerateChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
        current_request_id.set(request_id)
        self._check_lengths(request)
        sampling = sampling_from_proto(request.sampling, list(request.stop_token_ids))
        prompt = list(request.prompt_token_ids)
        if request.prefix_source:
            await self.kv.maybe_fetch_prefix(
                request_id, prompt, request.prefix_source, request.kv_codec
            )
        if request.handoff_target:
            stream = self.kv.generate_with_handoff(
                request_id, prompt, sampling, request.handoff_target, request.kv_codec
            )
        else:
            stream = self.engine.generate(request_id, prompt, sampling)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield _chunk(out)

    def _check_lengths(self, request: shard_pb2.ShardGenerateRequest) -> None:
        """Counts and id ranges, before anything is copied out of the message."""
        engine = self.engine.engine
        num_prompt = len(request.prompt_token_ids)
        if num_prompt >= engine.max_model_len:
            raise InvalidArgument(
                f"prompt has {num_prompt} tokens; the context holds {engine.max_model_len}"
            )
        vocab = engine.model.config.vocab_size
        stop_ids = request.stop_token_ids
        if len(stop_ids) <= MAX_STOP_TOKEN_IDS and any(not 0 <= t < vocab for t in stop_ids):
            raise InvalidArgument(f"stop_token_ids must be in [0, {vocab})")

    async def Abort(  # noqa: N802
        self, request: shard_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.AbortResponse:
        self.engine.abort(request.request_id)
        await self.kv.drop(request.request_id)
        return shard_pb2.AbortResponse(found=True)

    async def ExportKv(  # noqa: N802
        self, request: shard_pb2.ExportKvRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.KvChunk]:
        current_request_id.set(request.request_id)
        async with contextlib.aclosing(self.kv.export(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def ImportKv(  # noqa: N802
        self,
        request_iterator: AsyncIterator[shard_pb2.KvChunk],
        context: grpc.aio.ServicerContext,
    ) -> shard_pb2.ImportKvResponse:
        return await self.kv.import_(request_iterator)

    async def MoveKv(  # noqa: N802
        self, request: shard_pb2.MoveKvRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.MoveKvResponse:
        current_request_id.set(request.request_id)
        return await self.kv.move(request)

    async def Resume(  # noqa: N802
        self, request: shard_pb2.ResumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ShardGenerateChunk]:
        current_request_id.set(request.request_id)
        async with contextlib.aclosing(self.kv.resume(request.request_id)) as stream:
            async for out in stream:
                yield _chunk(out)

    async def Status(  # noqa: N802
        self, request: shard_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.StatusResponse:
        engine = self.engine.engine
        stats = self.engine.stats()
        cfg = engine.model.config
        return shard_pb2.StatusResponse(
            model=self.model_name,
            tp_size=self.tp_size,
            kv_blocks_free=stats.kv_blocks_free,
            kv_blocks_total=stats.kv_blocks_total,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            max_model_len=engine.max_model_len,
            vocab_size=cfg.vocab_size,
            eos_token_ids=sorted(engine.eos_token_ids),
            block_size=engine.kv.block_size,
            prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
            prefix_cache_query_tokens=stats.prefix_cache_query_tokens,
            dtype=self.dtype,
            num_preemptions=stats.num_preemptions,
            role=self.role,
            draining=self.draining,
            kv_geometry=self.kv.geometry,
        )


def _chunk(out: RequestOutput) -> shard_pb2.ShardGenerateChunk:
    return shard_pb2.ShardGenerateChunk(
        token_ids=out.new_token_ids,
        finish_reason=FINISH_TO_PROTO[out.finish_reason],
        prompt_tokens=out.num_prompt_tokens,
        cached_prompt_tokens=out.num_cached_tokens,
        queue_s=out.queue_s,
        migrated=out.finish_reason is FinishReason.MIGRATED,
        num_output_tokens=out.num_output_tokens,
    )
