"""Shard gRPC servicer: protobuf -> engine call -> protobuf, nothing more."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from serve.engine.engine import AsyncEngine
from serve.engine.request import FinishReason, SamplingParams
from serve.errors import InvalidArgument
from serve.gateway.interceptor import current_request_id

logger = logging.getLogger(__name__)

FINISH_TO_PROTO = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


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
    if not temperature >= 0.0:
        raise InvalidArgument("sampling.temperature must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument("sampling.top_p must be in (0, 1]")
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
    def __init__(self, engine: AsyncEngine, model_name: str, dtype: str, tp_size: int = 1) -> None:
        self.engine = engine
        self.model_name = model_name
        self.dtype = dtype
        self.tp_size = tp_size

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: shard_pb2.ShardGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ShardGenerateChunk]:
        request_id = request.request_id or uuid.uuid4().hex
        sampling = sampling_from_proto(request.sampling, list(request.stop_token_ids))
        current_request_id.set(request_id)
        stream = self.engine.generate(request_id, list(request.prompt_token_ids), sampling)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield shard_pb2.ShardGenerateChunk(
                    token_ids=out.new_token_ids,
                    finish_reason=FINISH_TO_PROTO[out.finish_reason],
                    prompt_tokens=out.num_prompt_tokens,
                    cached_prompt_tokens=out.num_cached_tokens,
                    queue_s=out.queue_s,
                )

    async def Abort(  # noqa: N802
        self, request: shard_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.AbortResponse:
        self.engine.abort(request.request_id)
        return shard_pb2.AbortResponse(found=True)

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
        )
