"""`shardwire.v1.Inference`: protobuf in, one call into the gateway modules, protobuf out.

Streams are written with `context.write` from the handler coroutine, so a client
cancel arrives here as CancelledError and closes the replica call at once.
Domain errors raised here become status codes in the interceptor. Every call
has a `RequestRecord`, which feeds the metrics and writes the call's log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from serve.errors import ShardwireError, Unavailable
from serve.gateway import admission, prompts
from serve.gateway.admission import Limits, ModelLimits, SamplingParams
from serve.gateway.generation import FinishReason, Generation, OutputChunk
from serve.gateway.interceptor import current_request_id, status_of
from serve.gateway.record import RequestRecord
from serve.gateway.router import Router
from serve.metrics import GatewayMetrics
from serve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Prompts longer than this (characters) are tokenized in a worker thread.
OFF_LOOP_CHARS = 16_384
_FINISH_TO_PROTO = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


def sampling_from_proto(msg: inference_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
    )


def chunk_to_proto(chunk: OutputChunk, request_id: str) -> inference_pb2.GenerateChunk:
    msg = inference_pb2.GenerateChunk(
        text=chunk.text, token_ids=chunk.token_ids, request_id=request_id
    )
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH_TO_PROTO[chunk.finish_reason]
    if chunk.usage is not None:
        u = chunk.usage
        msg.usage.prompt_tokens = u.prompt_tokens
        msg.usage.completion_tokens = u.completion_tokens
        msg.usage.cached_prompt_tokens = u.cached_prompt_tokens
    if chunk.timing is not None:
        t = chunk.timing
        msg.timing.queue_s = t.queue_s
        msg.timing.time_to_first_token_s = t.time_to_first_token_s
        msg.timing.total_s = t.total_s
    return msg


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        router: Router,
        model_id: str,
        limits: Limits,
        log_prompts: bool = False,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._router = router
        self._model_id = model_id
        self._limits = limits
        self._log_prompts = log_prompts
        self._metrics = metrics
        self._generation = Generation(tokenizer, router)

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async with self._call("Chat", request.request_id, context) as record:
            self._check_common(request, request.model)
            sampling = admission.validate_sampling(
                sampling_from_proto(request.sampling), self._limits
            )
            messages = admission.validate_messages([(m.role, m.content) for m in request.messages])
            self._log_prompt(record.request_id, "chat", messages)
            size = sum(len(m.content) for m in messages)
            ids = await _tokenize(size, prompts.chat_prompt_ids, self._tokenizer, messages)
            await self._stream(record, ids, sampling, "messages", context, request.session_id)

    async def Translate(
        self, request: inference_pb2.TranslateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async with self._call("Translate", request.request_id, context) as record:
            self._check_common(request, request.model)
            sampling = admission.validate_sampling(
                sampling_from_proto(request.sampling), self._limits
            )
            text = admission.validate_text(request.text, "text")
            self._log_prompt(record.request_id, "translate", text)
            ids = await _tokenize(
                len(text),
                prompts.translate_prompt_ids,
                self._tokenizer,
                text,
                request.source_lang,
                request.target_lang,
            )
            await self._stream(record, ids, sampling, "text", context)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async with self._call("Generate", request.request_id, context) as record:
            self._check_common(request, request.model)
            sampling = admission.validate_sampling(
                sampling_from_proto(request.sampling), self._limits
            )
            admission.validate_prompt_choice(request.prompt, request.prompt_token_ids)
            if request.prompt:
                self._log_prompt(record.request_id, "generate", request.prompt)
                size = len(request.prompt)
                build = prompts.text_prompt_ids
                ids = await _tokenize(size, build, self._tokenizer, request.prompt)
                field = "prompt"
            else:
                ids, field = list(request.prompt_token_ids), "prompt_token_ids"
            await self._stream(record, ids, sampling, field, context)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        healthy = self._router.healthy_replicas()
        known = healthy or [r for r in self._router.replicas if r.status is not None]
        info = inference_pb2.ModelInfo(id=self._model_id, num_replicas=len(healthy))
        if known and (status := known[0].status) is not None:
            info.max_context = status.max_model_len
            info.vocab_size = status.vocab_size
            info.tp_size = status.tp_size
            info.dtype = status.dtype
        return inference_pb2.ListModelsResponse(models=[info])

    @contextlib.asynccontextmanager
    async def _call(
        self, method: str, client_id: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[RequestRecord]:
        """One inference call: its record, in-flight gauge, final status and log line."""
        record = RequestRecord(method, self._model_id, self._metrics)
        record.request_id = _request_id(client_id)
        if self._metrics is not None:
            self._metrics.requests_in_flight.inc()
        try:
            yield record
        except BaseException as error:
            message = error.message if isinstance(error, ShardwireError) else type(error).__name__
            record.fail(status_of(error, context), message)
            raise
        finally:
            if self._metrics is not None:
                self._metrics.requests_in_flight.dec()
            record.end()

    def _check_common(self, request: Message, model: str) -> None:
        admission.check_request_size(request.ByteSize(), self._limits)
        admission.resolve_model(model, [self._model_id])

    def _log_prompt(self, rid: str, kind: str, content: object) -> None:
        if self._log_prompts:
            logger.info("[%s] %s prompt: %r", rid, kind, content)

    async def _stream(
        self,
        record: RequestRecord,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        field: str,
        context: grpc.aio.ServicerContext,
        session_id: str = "",
    ) -> None:
        """Runs the request on a replica, writing chunks to the client as they come."""
        rid = record.request_id
        replica = self._router.choose(session_id)
        status = replica.status
        if status is None:
            raise Unavailable(f"replica {replica.address} has not reported its model")
        limits = ModelLimits(vocab_size=status.vocab_size, max_model_len=status.max_model_len)
        admitted = admission.admit(rid, prompt_ids, sampling, limits, field)
        logger.debug(
            "[%s] admitted: %d prompt tokens, max_tokens %s, replica %s",
            rid,
            len(admitted.prompt_token_ids),
            admitted.sampling.max_tokens,
            replica.address,
        )
        timeout_s = context.time_remaining()
        outputs = self._generation.run(replica, admitted, record=record, timeout_s=timeout_s)
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    await context.write(chunk_to_proto(out, rid))
        except asyncio.CancelledError:
            logger.info("[%s] cancelled by the client; aborted on %s", rid, replica.address)
            raise


async def _tokenize(num_chars: int, build: Callable[..., list[int]], *args: Any) -> list[int]:
    """Builds prompt ids; long texts are tokenized off the event loop so that other
    streams keep flowing."""
    if num_chars > OFF_LOOP_CHARS:
        return await asyncio.to_thread(build, *args)
    return build(*args)


def _request_id(client_id: str) -> str:
    """The client's id made unique per request, or a fresh one; also set for log lines."""
    suffix = secrets.token_hex(6)
    rid = f"{client_id[:64]}-{suffix}" if client_id else suffix
    current_request_id.set(rid)
    return rid
