"""`shardwire.v1.Inference`: protobuf in, one call into the gateway modules, protobuf out.

Streams are written with `context.write` from the handler coroutine, so a client
cancel arrives here as CancelledError and closes the replica call at once.
Domain errors raised here become status codes in the interceptor. Every call
has a `RequestRecord`, which feeds the metrics and writes the call's log line
(each TranslateLive segment has its own as well).

`Chat` with `append_only` runs one turn of a session kept in `SessionStore`;
`TranslateLive` hands the stream to `LiveTranslation`.

Overload (`LoadGate`): every inference call takes a stream slot as it arrives, and
a full prompt-token queue refuses a call before its text is tokenized; both
refusals are RESOURCE_EXHAUSTED with a `retry-after-ms` trailing metadata hint.
A prompt's tokens stay queued from admission until its first token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from serve.config import LiveTranslateConfig, SessionConfig
from serve.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ShardwireError,
    Unavailable,
)
from serve.gateway import admission, prompts
from serve.gateway.admission import (
    RETRY_AFTER_KEY,
    Limits,
    LoadGate,
    ModelLimits,
    Overloaded,
    SamplingParams,
)
from serve.gateway.conversation import Conversation
from serve.gateway.generation import FinishReason, Generation, OutputChunk
from serve.gateway.interceptor import current_request_id, status_of
from serve.gateway.live import (
    LiveSettings,
    LiveTranslation,
    RunPrompt,
    SegmentCall,
    SegmentInput,
)
from serve.gateway.prompts import ChatMessage
from serve.gateway.record import RequestRecord
from serve.gateway.router import Router
from serve.gateway.sessions import SessionStore
from serve.metrics import GatewayMetrics
from serve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Prompts longer than this (characters) are tokenized in a worker thread.
OFF_LOOP_CHARS = 16_384
# What one chat message costs the template beyond its text, counted in characters
# when choosing where to tokenize.
MESSAGE_OVERHEAD_CHARS = 32
_FINISH_TO_PROTO = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}


@dataclass(frozen=True)
class Answer:
    """What a stream sent to its client: text, generated ids and how it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None


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
        sessions: SessionConfig | None = None,
        live: LiveTranslateConfig | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._router = router
        self._model_id = model_id
        self._limits = limits
        self._log_prompts = log_prompts
        self._metrics = metrics
        self._generation = Generation(tokenizer, router)
        self.sessions = SessionStore(sessions or SessionConfig(), lambda: Conversation(tokenizer))
        self._live_limits = live or LiveTranslateConfig()
        self.load = LoadGate(limits)

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async with self._call("Chat", request.request_id, context) as record:
            self._check_common(request, request.model)
            sampling = admission.validate_sampling(
                sampling_from_proto(request.sampling), self._limits
            )
            messages = admission.validate_messages(
                [(m.role, m.content) for m in request.messages], self._limits.max_messages
            )
            admission.validate_session_id(request.session_id)
            self._log_prompt(record.request_id, "chat", messages)
            self.load.check_queue()
            if request.append_only:
                await self._session_turn(record, request.session_id, messages, sampling, context)
                return
            size = _chat_size(messages)
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
            admission.validate_language_code(request.source_lang, "source_lang")
            admission.validate_language_code(request.target_lang, "target_lang")
            self._log_prompt(record.request_id, "translate", text)
            self.load.check_queue()
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
            self.load.check_queue()
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
            with self.load.stream():
                yield record
        except BaseException as error:
            if isinstance(error, Overloaded):
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(error.retry_after_ms)),))
            record.fail(status_of(error, context), _error_message(error))
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
        *,
        reply_session_id: str = "",
    ) -> Answer:
        """Runs the request on a replica, writing chunks to the client as they come
        (tagged with `reply_session_id` when set); returns what was sent."""
        rid = record.request_id
        timeout_s = context.time_remaining()
        outputs = self._generate(record, prompt_ids, sampling, field, timeout_s, session_id)
        pieces: list[str] = []
        ids: list[int] = []
        finish: FinishReason | None = None
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    msg = chunk_to_proto(out, rid)
                    if reply_session_id:
                        msg.session_id = reply_session_id
                    await context.write(msg)
                    pieces.append(out.text)
                    ids.extend(out.token_ids)
                    finish = out.finish_reason or finish
        except asyncio.CancelledError:
            logger.info("[%s] cancelled by the client; aborted on %s", rid, record.replica)
            raise
        return Answer("".join(pieces), tuple(ids), finish)

    async def _generate(
        self,
        record: RequestRecord,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        field: str,
        timeout_s: float | None,
        session_id: str = "",
    ) -> AsyncIterator[OutputChunk]:
        """Admits the prompt and streams its output from a replica (the session's
        replica when it has one); once the stream finished, the session is bound to
        the replica that served it, and the router remembers that this replica holds
        the prompt and answer."""
        rid = record.request_id
        replica = self._router.choose(session_id, prompt_ids)
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
        queued = self.load.queue_prompt(len(admitted.prompt_token_ids))
        answer_ids: list[int] = []
        try:
            outputs = self._generation.run(
                replica, admitted, record=record, timeout_s=timeout_s, session_id=session_id
            )
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    if out.token_ids or out.finish_reason is not None:
                        queued.release()
                    answer_ids.extend(out.token_ids)
                    yield out
        finally:
            queued.release(measured=False)
        self._router.bind(session_id, record.replica)
        self._router.remember(record.replica, [*admitted.prompt_token_ids, *answer_ids])

    # -- sessions --------------------------------------------------------------------

    async def _session_turn(
        self,
        record: RequestRecord,
        session_id: str,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """One append_only turn: the session's conversation plus `messages`; the
        answer joins the conversation once it finished."""
        store = self.sessions
        if session_id:
            session = store.acquire(session_id)
        else:
            store.check_turn(messages, None)
            session = store.open()
        try:
            store.check_turn(messages, session)
            conv = session.conversation
            size = conv.num_bytes + sum(len(m.content) for m in messages)
            turn = await _tokenize(size, conv.prompt, messages)
            logger.debug(
                "[%s] session %s turn %d: %d prompt tokens, %d kept",
                record.request_id,
                session.session_id,
                session.num_answers + 1,
                len(turn.token_ids),
                turn.num_kept_tokens,
            )
            answer = await self._stream(
                record,
                turn.token_ids,
                sampling,
                "messages (with the session's conversation)",
                context,
                session.session_id,
                reply_session_id=session.session_id,
            )
            if answer.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                # Built off the loop for long conversations, applied here at once: a
                # turn cancelled meanwhile leaves the session as it was.
                state = await _tokenize(size, conv.appended, turn, answer.text, answer.token_ids)
                conv.commit(state)
                session.num_answers += 1
                session.replica = record.replica
        finally:
            store.release(session)
            if session.is_closed:  # closed during the turn, or its first turn failed
                self._router.unbind(session.session_id)

    async def CloseSession(
        self, request: inference_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.CloseSessionResponse:
        if not request.session_id:
            raise InvalidArgument("session_id must not be empty")
        admission.validate_session_id(request.session_id)
        session = self.sessions.close(request.session_id)
        self._router.unbind(request.session_id)
        if session is not None:
            logger.debug(
                "session %s closed after %d answers", request.session_id, session.num_answers
            )
        return inference_pb2.CloseSessionResponse(found=session is not None)

    # -- live translation ------------------------------------------------------------

    async def TranslateLive(
        self,
        request_iterator: AsyncIterator[inference_pb2.TranslateLiveRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        async with self._call("TranslateLive", "", context) as record:
            requests = aiter(request_iterator)
            first = await _next_message(requests, self._live_limits.config_timeout_s, "config")
            if first is None or first.WhichOneof("kind") != "config":
                raise InvalidArgument("the first TranslateLiveRequest must carry config")
            config = first.config
            record.request_id = _request_id(config.request_id)
            settings = self._live_settings(config)
            live = LiveTranslation(
                self._tokenizer,
                settings,
                self._live_limits,
                run_prompt=self._live_prompt(context),
                segment_call=self._segment_call(record),
                stream_id=record.request_id,
                log_prompts=self._log_prompts,
            )

            async def emit(index: int, rid: str, out: OutputChunk) -> None:
                chunk = chunk_to_proto(out, rid)
                await context.write(
                    inference_pb2.TranslateLiveResponse(segment_index=index, chunk=chunk)
                )

            try:
                idle_s = self._live_limits.idle_timeout_s
                await live.run(_segments(requests, idle_s, lambda: live.num_pending > 0), emit)
            finally:
                self._router.unbind(record.request_id)
                logger.debug(
                    "[%s] live stream ends: %d segments translated",
                    record.request_id,
                    live.num_translated,
                )

    def _live_settings(self, config: inference_pb2.TranslateLiveConfig) -> LiveSettings:
        self._check_common(config, config.model)
        sampling = admission.validate_sampling(sampling_from_proto(config.sampling), self._limits)
        admission.validate_language_code(config.target_lang, "config.target_lang")
        admission.validate_language_code(config.source_lang, "config.source_lang")
        prompts.language_name(config.target_lang, "config.target_lang")
        source = config.source_lang.strip().lower()
        if source not in ("", prompts.AUTO_LANGUAGE):
            prompts.language_name(source, "config.source_lang")
        if self._tokenizer.chat_template is None:
            raise FailedPrecondition("the model has no chat template; live translation needs one")
        limits = self._live_limits
        num_context = limits.default_context_segments
        if config.HasField("context_segments"):
            num_context = config.context_segments
        if num_context > limits.max_context_segments:
            raise InvalidArgument(
                f"config.context_segments must be at most {limits.max_context_segments}, "
                f"got {num_context}"
            )
        known = [r.status for r in self._router.healthy_replicas() if r.status is not None]
        if not known:
            raise Unavailable("no healthy replica")
        return LiveSettings(
            source_lang=config.source_lang,
            target_lang=config.target_lang,
            sampling=sampling,
            context_segments=num_context,
            max_model_len=min(s.max_model_len for s in known),
        )

    def _live_prompt(self, context: grpc.aio.ServicerContext) -> RunPrompt:
        def run(
            record: RequestRecord,
            prompt_ids: Sequence[int],
            sampling: SamplingParams,
            field: str,
            affinity: str,
        ) -> AsyncIterator[OutputChunk]:
            timeout_s = context.time_remaining()
            return self._generate(record, prompt_ids, sampling, field, timeout_s, affinity)

        return run

    def _segment_call(self, stream: RequestRecord) -> SegmentCall:
        """Per segment: a record of its own (method TranslateLiveSegment, arrival when
        the segment became final), whose counts also add up in the stream's record."""

        @contextlib.asynccontextmanager
        async def call(index: int, arrival: float) -> AsyncIterator[RequestRecord]:
            record = RequestRecord("TranslateLiveSegment", self._model_id, self._metrics)
            record.request_id = f"{stream.request_id}-{index}"
            record.arrival = arrival
            try:
                yield record
            except BaseException as error:
                record.fail(status_of(error), _error_message(error))
                raise
            finally:
                record.end()
                stream.replica = record.replica
                stream.prompt_tokens += record.prompt_tokens
                stream.cached_prompt_tokens += record.cached_prompt_tokens
                stream.completion_tokens += record.completion_tokens

        return call


async def _segments(
    requests: AsyncIterator[inference_pb2.TranslateLiveRequest],
    idle_timeout_s: float,
    busy: Callable[[], bool],
) -> AsyncIterator[SegmentInput]:
    """The segment messages after the first; another config is refused, and so is
    a stream silent for longer than idle_timeout_s while none of its segments waits
    for its translation (a client may wait for those before it sends more)."""
    while True:
        request = await _next_message(requests, idle_timeout_s, "message", busy)
        if request is None:
            return
        if request.WhichOneof("kind") != "segment":
            raise InvalidArgument("only the first TranslateLiveRequest may carry config")
        yield SegmentInput(request.segment.text, request.segment.final)


async def _next_message(
    requests: AsyncIterator[inference_pb2.TranslateLiveRequest],
    timeout_s: float,
    what: str,
    busy: Callable[[], bool] = lambda: False,
) -> inference_pb2.TranslateLiveRequest | None:
    """The stream's next message (None at its end), or DEADLINE_EXCEEDED when none
    comes within timeout_s and the stream is not `busy` then."""
    read = asyncio.ensure_future(anext(requests, None))
    try:
        while True:
            done, _ = await asyncio.wait({read}, timeout=timeout_s)
            if done:
                return read.result()
            if not busy():
                raise DeadlineExceeded(f"no TranslateLive {what} within {timeout_s:g} s")
    finally:
        if not read.done():
            read.cancel()


def _chat_size(messages: Sequence[ChatMessage]) -> int:
    """A conversation's size in characters, for choosing where to tokenize it."""
    return sum(len(m.content) + MESSAGE_OVERHEAD_CHARS for m in messages)


async def _tokenize(num_chars: int, build: Callable[..., T], *args: Any) -> T:
    """Builds prompt ids (or a conversation's next state); long texts are tokenized
    off the event loop so that other streams keep flowing."""
    if num_chars > OFF_LOOP_CHARS:
        return await asyncio.to_thread(build, *args)
    return build(*args)


def _error_message(error: BaseException) -> str:
    return error.message if isinstance(error, ShardwireError) else type(error).__name__


def _request_id(client_id: str) -> str:
    """The client's id made unique per request, or a fresh one; also set for log lines."""
    suffix = secrets.token_hex(6)
    rid = f"{client_id[:64]}-{suffix}" if client_id else suffix
    current_request_id.set(rid)
    return rid
