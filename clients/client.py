"""shardwire client SDK: `Client` (blocking) and `AsyncClient` (asyncio).

Needs only grpcio and protobuf. Every streaming call returns an iterator of
`Chunk`; the last chunk carries `finish_reason` ("stop", "length" or "abort"),
`usage` and `timing`. Failures surface as `grpc.RpcError` (for AsyncClient,
`grpc.aio.AioRpcError`, a subclass) with `.code()` and `.details()`, e.g.
INVALID_ARGUMENT naming the bad field, NOT_FOUND for an unknown model,
UNAVAILABLE when no replica can serve, DEADLINE_EXCEEDED past `timeout`.
Streams start when first iterated. Closing one early (`stream.close()`, or
`await stream.aclose()`, or dropping it) cancels the call, which frees the
request's KV cache on the server at once.

Sessions: `chat(message, append_only=True)` opens a session the gateway keeps;
every chunk carries its `session_id`, and later turns send only the new message
with `session_id=...` and `append_only=True`. `close_session` drops it. A
session the gateway no longer holds gives NOT_FOUND; send the whole
conversation with append_only and no session_id to open a new one.

Live translation: `translate_live(segments, source=..., target=...)` streams
`SegmentChunk`s; `segments` yields strings (complete segments) or
`(text, final)` pairs (pieces joined until a final one), and the stream ends
after the translation of the last segment once `segments` is exhausted. The
gateway refuses a stream with RESOURCE_EXHAUSTED when too many segments wait
untranslated, so the SDK holds back segments while `max_in_flight` (default 4)
are untranslated; None sends them as they come.

Security: `api_key` is sent as `authorization: Bearer KEY` with every call (a
gateway with keys refuses calls without one with UNAUTHENTICATED). `tls_ca` (the
CA to trust; PEM bytes or a file path), or `tls=True` for the system's roots,
turns TLS on; `tls_cert` and `tls_key` add a client certificate for a gateway that
requires mutual TLS, and `tls_server_name` names the certificate's host when it is
not the target's.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from shardwire.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
Messages = str | Sequence[Mapping[str, str] | tuple[str, str]]
# A complete segment, or (text, final): pieces with final False join the next segment.
Segment = str | tuple[str, bool]
# PEM data, or the path of a PEM file.
Pem = bytes | str | os.PathLike[str]
Metadata = tuple[tuple[str, str], ...]

_FINISH_NAMES = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
# Segments a live stream sends ahead of their translations (the gateway's default
# limit is 8).
DEFAULT_MAX_IN_FLIGHT = 4


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
class Chunk:
    """New text and token ids; finish_reason, usage and timing only on the last chunk."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None
    # The chat session of an append_only call.
    session_id: str = ""


@dataclass(frozen=True)
class SegmentChunk:
    """A piece of the translation of segment `segment_index` (0-based); the segment's
    last piece has finish_reason, usage and timing (timed from when the segment
    reached the gateway complete)."""

    segment_index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    timing: Timing | None = None

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_context: int
    vocab_size: int
    tp_size: int
    dtype: str
    num_replicas: int


def sampling_params(**sampling: Any) -> inference_pb2.SamplingParams:
    """SamplingParams from keyword arguments; None leaves a field at the server default."""
    unknown = set(sampling) - set(_SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
    msg = inference_pb2.SamplingParams()
    for key, value in sampling.items():
        if value is None:
            continue
        if key == "stop":
            msg.stop.extend([value] if isinstance(value, str) else list(value))
        else:
            setattr(msg, key, value)
    return msg


def chat_messages(messages: Messages) -> list[inference_pb2.ChatMessage]:
    """A string is one user message; otherwise dicts with role/content or (role, content)."""
    if isinstance(messages, str):
        return [inference_pb2.ChatMessage(role="user", content=messages)]
    out = []
    for message in messages:
        if isinstance(message, Mapping):
            role, content = message["role"], message["content"]
        else:
            role, content = message
        out.append(inference_pb2.ChatMessage(role=role, content=content))
    return out


def chunk_from_proto(msg: inference_pb2.GenerateChunk) -> Chunk:
    finish = _FINISH_NAMES.get(msg.finish_reason)
    usage = timing = None
    if finish is not None:
        u, t = msg.usage, msg.timing
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
        timing = Timing(t.queue_s, t.time_to_first_token_s, t.total_s)
    return Chunk(msg.text, tuple(msg.token_ids), finish, usage, timing, msg.session_id)


def segment_chunk_from_proto(msg: inference_pb2.TranslateLiveResponse) -> SegmentChunk:
    c = chunk_from_proto(msg.chunk)
    return SegmentChunk(msg.segment_index, c.text, c.token_ids, c.finish_reason, c.usage, c.timing)


def _model_info(msg: inference_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        msg.id, msg.max_context, msg.vocab_size, msg.tp_size, msg.dtype, msg.num_replicas
    )


def chat_request(
    messages: Messages, model: str, session_id: str, append_only: bool = False, **sampling: Any
) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        model=model,
        messages=chat_messages(messages),
        sampling=sampling_params(**sampling),
        session_id=session_id,
        append_only=append_only,
    )


def live_config_request(
    source: str, target: str, model: str, context_segments: int | None, **sampling: Any
) -> inference_pb2.TranslateLiveRequest:
    config = inference_pb2.TranslateLiveConfig(
        model=model,
        source_lang=source,
        target_lang=target,
        sampling=sampling_params(**sampling),
    )
    if context_segments is not None:
        config.context_segments = context_segments
    return inference_pb2.TranslateLiveRequest(config=config)


def segment_request(segment: Segment) -> inference_pb2.TranslateLiveRequest:
    text, final = (segment, True) if isinstance(segment, str) else segment
    return inference_pb2.TranslateLiveRequest(
        segment=inference_pb2.TranslateSegment(text=text, final=final)
    )


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class ChannelSettings:
    """How a client reaches the gateway: credentials (None: plaintext), channel
    options and the metadata sent with every call."""

    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, str], ...]
    metadata: Metadata | None

    @classmethod
    def build(
        cls,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls_server_name: str | None = None,
    ) -> ChannelSettings:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate (tls_cert) needs its key (tls_key), and back")
        credentials = None
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca),
                private_key=_pem(tls_key),
                certificate_chain=_pem(tls_cert),
            )
        elif tls_server_name:
            raise ValueError("tls_server_name needs TLS (tls=True or tls_ca)")
        options = (("grpc.ssl_target_name_override", tls_server_name),) if tls_server_name else ()
        if api_key and not all(0x21 <= ord(c) <= 0x7E for c in api_key):
            raise ValueError("api_key must be printable ASCII without spaces")
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        return cls(credentials, options, metadata)

    def channel(self, target: str) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(target, options=self.options)
        return grpc.secure_channel(target, self.credentials, options=self.options)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(target, options=self.options)
        return grpc.aio.secure_channel(target, self.credentials, options=self.options)


class _Window:
    """Blocks the request side while `size` final segments await their translation."""

    def __init__(self, size: int | None) -> None:
        self._slots = threading.Semaphore(size) if size else None
        self.closed = threading.Event()

    def acquire(self) -> bool:
        """False once the call is over."""
        if self._slots is None:
            return not self.closed.is_set()
        while not self._slots.acquire(timeout=0.1):
            if self.closed.is_set():
                return False
        return not self.closed.is_set()

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()


def live_requests(
    first: inference_pb2.TranslateLiveRequest, segments: Iterable[Segment], window: _Window
) -> Iterator[inference_pb2.TranslateLiveRequest]:
    yield first
    for segment in segments:
        request = segment_request(segment)
        if request.segment.final and not window.acquire():
            return
        yield request


async def live_requests_async(
    first: inference_pb2.TranslateLiveRequest,
    segments: AsyncIterable[Segment] | Iterable[Segment],
    slots: asyncio.Semaphore | None,
) -> AsyncIterator[inference_pb2.TranslateLiveRequest]:
    yield first
    if isinstance(segments, AsyncIterable):
        async for segment in segments:
            request = segment_request(segment)
            if slots is not None and request.segment.final:
                await slots.acquire()
            yield request
    else:
        for segment in segments:
            request = segment_request(segment)
            if slots is not None and request.segment.final:
                await slots.acquire()
            yield request


def translate_request(
    text: str, source: str, target: str, model: str, **sampling: Any
) -> inference_pb2.TranslateRequest:
    return inference_pb2.TranslateRequest(
        model=model,
        text=text,
        source_lang=source,
        target_lang=target,
        sampling=sampling_params(**sampling),
    )


def generate_request(
    prompt: str | Sequence[int], model: str, **sampling: Any
) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model=model, sampling=sampling_params(**sampling))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    return request


class Client:
    """Blocking client. `timeout` (seconds) is the deadline of each call; the other
    arguments are described under "Security" in the module's docstring."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        settings = ChannelSettings.build(api_key, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = settings.channel(target)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._timeout = timeout
        self._metadata = settings.metadata

    def chat(
        self,
        messages: Messages,
        *,
        model: str = "",
        session_id: str = "",
        append_only: bool = False,
        **sampling: Any,
    ) -> Iterator[Chunk]:
        """With append_only, `messages` are the new turn of session `session_id`
        (empty: open a new session; its id is on every chunk)."""
        request = chat_request(messages, model, session_id, append_only, **sampling)
        return self._stream(self._stub.Chat, request)

    def close_session(self, session_id: str) -> bool:
        """Drops a chat session; False if the gateway did not hold it."""
        request = inference_pb2.CloseSessionRequest(session_id=session_id)
        return self._stub.CloseSession(
            request, timeout=self._timeout, metadata=self._metadata
        ).found

    def translate_live(
        self,
        segments: Iterable[Segment],
        *,
        source: str = "auto",
        target: str,
        model: str = "",
        context_segments: int | None = None,
        max_in_flight: int | None = DEFAULT_MAX_IN_FLIGHT,
        **sampling: Any,
    ) -> Iterator[SegmentChunk]:
        """Translates segments as `segments` yields them (it is read on a gRPC
        thread, so it may block, e.g. on stdin)."""
        first = live_config_request(source, target, model, context_segments, **sampling)
        window = _Window(max_in_flight)
        requests = live_requests(first, segments, window)
        call = self._stub.TranslateLive(requests, timeout=self._timeout, metadata=self._metadata)
        try:
            for msg in call:
                chunk = segment_chunk_from_proto(msg)
                if chunk.is_last:
                    window.release()
                yield chunk
        finally:
            window.closed.set()
            call.cancel()

    def translate(
        self, text: str, *, source: str = "auto", target: str, model: str = "", **sampling: Any
    ) -> Iterator[Chunk]:
        request = translate_request(text, source, target, model, **sampling)
        return self._stream(self._stub.Translate, request)

    def generate(
        self, prompt: str | Sequence[int], *, model: str = "", **sampling: Any
    ) -> Iterator[Chunk]:
        return self._stream(self._stub.Generate, generate_request(prompt, model, **sampling))

    def list_models(self) -> list[ModelInfo]:
        request = inference_pb2.ListModelsRequest()
        response = self._stub.ListModels(request, timeout=self._timeout, metadata=self._metadata)
        return [_model_info(m) for m in response.models]

    def _stream(self, method: Any, request: Any) -> Iterator[Chunk]:
        call = method(request, timeout=self._timeout, metadata=self._metadata)
        try:
            for msg in call:
                yield chunk_from_proto(msg)
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; arguments and methods mirror `Client`, returning async iterators."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        settings = ChannelSettings.build(api_key, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = settings.aio_channel(target)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._timeout = timeout
        self._metadata = settings.metadata

    def chat(
        self,
        messages: Messages,
        *,
        model: str = "",
        session_id: str = "",
        append_only: bool = False,
        **sampling: Any,
    ) -> AsyncIterator[Chunk]:
        request = chat_request(messages, model, session_id, append_only, **sampling)
        return self._stream(self._stub.Chat, request)

    async def close_session(self, session_id: str) -> bool:
        request = inference_pb2.CloseSessionRequest(session_id=session_id)
        return (
            await self._stub.CloseSession(request, timeout=self._timeout, metadata=self._metadata)
        ).found

    async def translate_live(
        self,
        segments: AsyncIterable[Segment] | Iterable[Segment],
        *,
        source: str = "auto",
        target: str,
        model: str = "",
        context_segments: int | None = None,
        max_in_flight: int | None = DEFAULT_MAX_IN_FLIGHT,
        **sampling: Any,
    ) -> AsyncIterator[SegmentChunk]:
        first = live_config_request(source, target, model, context_segments, **sampling)
        slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        requests = live_requests_async(first, segments, slots)
        call = self._stub.TranslateLive(requests, timeout=self._timeout, metadata=self._metadata)
        try:
            async for msg in call:
                chunk = segment_chunk_from_proto(msg)
                if chunk.is_last and slots is not None:
                    slots.release()
                yield chunk
        finally:
            call.cancel()

    def translate(
        self, text: str, *, source: str = "auto", target: str, model: str = "", **sampling: Any
    ) -> AsyncIterator[Chunk]:
        request = translate_request(text, source, target, model, **sampling)
        return self._stream(self._stub.Translate, request)

    def generate(
        self, prompt: str | Sequence[int], *, model: str = "", **sampling: Any
    ) -> AsyncIterator[Chunk]:
        return self._stream(self._stub.Generate, generate_request(prompt, model, **sampling))

    async def list_models(self) -> list[ModelInfo]:
        request = inference_pb2.ListModelsRequest()
        response = await self._stub.ListModels(
            request, timeout=self._timeout, metadata=self._metadata
        )
        return [_model_info(m) for m in response.models]

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[Chunk]:
        call = method(request, timeout=self._timeout, metadata=self._metadata)
        try:
            async for msg in call:
                yield chunk_from_proto(msg)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
