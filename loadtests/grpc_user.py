"""A locust User that speaks shardwire's gRPC API and reports what users of a
streaming LLM service care about.

Each streamed call fires locust's `request` event several times, one row per
measure, with the task as `name`:

- `TTFT`: call start to the first chunk that carries tokens;
- `ITL`: the gap between token-bearing chunks, one sample per token (a chunk of
  k tokens after a gap g counts k gaps of g/k), or with `itl_per_request` one
  sample per call: the mean gap from the first token to the last;
- `E2E`: call start to the last chunk; `response_length` is the number of
  generated tokens, so locust's average content size is tokens per request.

A failed call fires one `E2E` row whose exception is its gRPC status code name,
so locust's failure table groups failures by code.

`CALL_LOG`, when opened, also gets one CSV line per call (end time, users
running, task, status, TTFT, mean ITL, E2E, tokens): report.py plots latency
and throughput against the user count from it.

grpc is made gevent-cooperative here, after locust has patched the standard
library and before any channel exists.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import IO, Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.env import Environment
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from clients.client import (
    ChannelSettings,
    Messages,
    chat_request,
    chunk_from_proto,
    generate_request,
    translate_request,
)
from loadtests.slo import E2E, ITL, TTFT

grpc_gevent.init_gevent()

logger = logging.getLogger(__name__)


class StatusError(Exception):
    """A call that ended with a non-OK status; str() is the code name alone."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return self.code


@dataclass(frozen=True)
class CallRecord:
    """One call, as a line of the calls CSV."""

    end_time: float  # Unix seconds
    users: int
    task: str
    status: str
    ttft_ms: float | None
    itl_ms: float | None  # mean gap between this call's tokens
    e2e_ms: float
    tokens: int


CALL_FIELDS = tuple(f.name for f in fields(CallRecord))


class CallLog:
    """Writes CallRecords to a CSV file while open; a no-op otherwise."""

    def __init__(self) -> None:
        self._file: IO[str] | None = None
        self._writer: Any = None

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(CALL_FIELDS)

    def write(self, record: CallRecord) -> None:
        if self._writer is not None:
            self._writer.writerow(_csv_values(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None


def _csv_values(record: CallRecord) -> list[Any]:
    out: list[Any] = []
    for value in astuple(record):
        if value is None:
            out.append("")
        elif isinstance(value, float):
            out.append(f"{value:.3f}")
        else:
            out.append(value)
    return out


CALL_LOG = CallLog()


@dataclass(frozen=True)
class StreamResult:
    text: str
    num_tokens: int
    finish_reason: str | None
    ttft_s: float | None
    itl_s: float | None  # mean gap between tokens; None below two tokens
    total_s: float


class InferenceClient:
    """The Inference stub plus timing; every call reports its rows to locust."""

    def __init__(
        self,
        target: str,
        fire: Callable[..., Any],
        *,
        timeout_s: float | None = None,
        itl_per_request: bool = False,
        on_call: Callable[[str, str, StreamResult | None, float, int], None] | None = None,
        settings: ChannelSettings | None = None,
    ) -> None:
        settings = settings or ChannelSettings.build()
        self._channel = settings.channel(target)
        self._metadata = settings.metadata
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._fire = fire
        self._timeout_s = timeout_s
        self._itl_per_request = itl_per_request
        # (task, status, result or None, seconds, tokens) after every call.
        self._on_call = on_call

    def chat(
        self, name: str, messages: Messages, session_id: str = "", **sampling: Any
    ) -> StreamResult | None:
        request = chat_request(messages, "", session_id, **sampling)
        return self.stream(name, self._stub.Chat, request)

    def translate(
        self, name: str, text: str, source: str, target: str, **sampling: Any
    ) -> StreamResult | None:
        request = translate_request(text, source, target, "", **sampling)
        return self.stream(name, self._stub.Translate, request)

    def generate(self, name: str, prompt: str, **sampling: Any) -> StreamResult | None:
        return self.stream(name, self._stub.Generate, generate_request(prompt, "", **sampling))

    def stream(self, name: str, method: Any, request: Any) -> StreamResult | None:
        """Runs one streaming call; None when it failed (already reported)."""
        start = time.perf_counter()
        first_at: float | None = None
        last_at = start
        num_tokens = 0
        finish: str | None = None
        pieces: list[str] = []
        call = method(request, timeout=self._timeout_s, metadata=self._metadata)
        try:
            for msg in call:
                now = time.perf_counter()
                n = len(msg.token_ids)
                if n:
                    if first_at is None:
                        first_at = now
                        self._report(TTFT, name, now - start, n)
                    elif not self._itl_per_request:
                        self._report_gaps(name, (now - last_at) / n, n)
                    last_at = now
                    num_tokens += n
                pieces.append(msg.text)
                if msg.finish_reason:
                    finish = chunk_from_proto(msg).finish_reason
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            details = err.details() if hasattr(err, "details") else str(err)
            logger.debug("%s failed: %s: %s", name, status, details)
            elapsed = time.perf_counter() - start
            self._report(E2E, name, elapsed, num_tokens, StatusError(status, details))
            if self._on_call is not None:
                self._on_call(name, status, None, elapsed, num_tokens)
            return None
        finally:
            call.cancel()
        end = time.perf_counter()
        if self._itl_per_request and first_at is not None and num_tokens > 1:
            self._report(ITL, name, (last_at - first_at) / (num_tokens - 1), num_tokens - 1)
        self._report(E2E, name, end - start, num_tokens)
        ttft = None if first_at is None else first_at - start
        itl = None
        if first_at is not None and num_tokens > 1:
            itl = (last_at - first_at) / (num_tokens - 1)
        result = StreamResult("".join(pieces), num_tokens, finish, ttft, itl, end - start)
        if self._on_call is not None:
            self._on_call(name, "OK", result, end - start, num_tokens)
        return result

    def _report_gaps(self, name: str, gap_s: float, count: int) -> None:
        for _ in range(count):
            self._report(ITL, name, gap_s, 1)

    def _report(
        self,
        kind: str,
        name: str,
        seconds: float,
        length: int,
        exception: Exception | None = None,
    ) -> None:
        self._fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )

    def list_models(self) -> Iterable[inference_pb2.ModelInfo]:
        request = inference_pb2.ListModelsRequest()
        return self._stub.ListModels(request, timeout=10, metadata=self._metadata).models

    def close(self) -> None:
        self._channel.close()


class InferenceUser(User):
    """Base class: `self.client` talks to the gateway given by `--host host:port`."""

    abstract = True
    timeout_s: float | None = 120.0
    itl_per_request = False
    # TLS and the API key of a secured gateway (plaintext and none by default).
    channel_settings: ChannelSettings | None = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise ValueError("give the gateway as --host host:port, e.g. -H 127.0.0.1:50051")
        target = self.host.removeprefix("grpc://").removeprefix("http://").rstrip("/")
        self.client = InferenceClient(
            target,
            environment.events.request.fire,
            timeout_s=self.timeout_s,
            itl_per_request=self.itl_per_request,
            on_call=self._log_call,
            settings=self.channel_settings,
        )

    def _log_call(
        self, task: str, status: str, result: StreamResult | None, seconds: float, tokens: int
    ) -> None:
        if not CALL_LOG.is_open:
            return
        runner = self.environment.runner
        CALL_LOG.write(
            CallRecord(
                end_time=time.time(),
                users=runner.user_count if runner is not None else 0,
                task=task,
                status=status,
                ttft_ms=_ms(result.ttft_s) if result is not None else None,
                itl_ms=_ms(result.itl_s) if result is not None else None,
                e2e_ms=seconds * 1000.0,
                tokens=tokens,
            )
        )

    def on_stop(self) -> None:
        self.client.close()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
