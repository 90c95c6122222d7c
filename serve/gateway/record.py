"""One inference call as the gateway saw it: counts and clocks filled in while it
runs, turned into metrics as tokens arrive and into one log line when it ends.

The log line never holds prompt or output text. With `--log-format json` its
fields (request_id, method, model, status, finish_reason, prompt_tokens,
cached_prompt_tokens, completion_tokens, queue_s, ttft_s, total_s, replica,
error) are top-level keys beside `msg`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from serve.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

OK = "OK"


@dataclass
class RequestRecord:
    method: str
    model: str
    metrics: GatewayMetrics | None = None
    request_id: str = "-"
    # time.monotonic() when the call reached the gateway.
    arrival: float = field(default_factory=time.monotonic)
    status: str = OK
    error: str = ""
    replica: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    ended_at: float | None = None

    def admitted(self, replica: str, num_prompt_tokens: int) -> None:
        self.replica = replica
        self.prompt_tokens = num_prompt_tokens

    def add(
        self,
        num_tokens: int,
        *,
        prompt_tokens: int = 0,
        cached_prompt_tokens: int = 0,
        queue_s: float = 0.0,
        now: float | None = None,
    ) -> None:
        """One chunk from the replica; the replica's counts win over ours when set."""
        now = time.monotonic() if now is None else now
        if prompt_tokens:
            self.prompt_tokens = prompt_tokens
        if cached_prompt_tokens:
            self.cached_prompt_tokens = cached_prompt_tokens
        if queue_s:
            self.queue_s = queue_s
        if not num_tokens:
            return
        m = self.metrics
        if self.first_token_at is None:
            self.first_token_at = now
            if m is not None:
                m.time_to_first_token.observe(now - self.arrival)
                m.request_queue_time.observe(self.queue_s)
                m.prompt_tokens.inc(self.prompt_tokens)
                m.cached_prompt_tokens.inc(self.cached_prompt_tokens)
        elif m is not None and self.last_token_at is not None:
            gap = (now - self.last_token_at) / num_tokens
            for _ in range(num_tokens):
                m.inter_token_latency.observe(gap)
        self.last_token_at = now
        self.completion_tokens += num_tokens
        if m is not None:
            m.generation_tokens.inc(num_tokens)

    def finish(self, reason: str, now: float | None = None) -> None:
        """The stream's last chunk is about to go out."""
        self.finish_reason = reason
        self.finished_at = time.monotonic() if now is None else now

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def total_s(self) -> float:
        end = self.finished_at or self.ended_at or time.monotonic()
        return end - self.arrival

    def fail(self, status: str, message: str) -> None:
        self.status = status
        self.error = message

    def end(self) -> None:
        """Counts the call by its final status and writes its log line; once."""
        if self.ended_at is not None:
            return
        self.ended_at = time.monotonic()
        m = self.metrics
        if m is not None:
            m.requests.labels(self.method, self.status).inc()
            if self.status == OK and self.finished_at is not None:
                m.e2e_request_latency.observe(self.total_s)
        log_request(self)


def log_fields(record: RequestRecord) -> dict[str, Any]:
    """The structured fields of a request's log line."""
    ttft = record.time_to_first_token_s
    fields: dict[str, Any] = {
        "event": "request",
        "request_id": record.request_id,
        "method": record.method,
        "model": record.model,
        "status": record.status,
        "finish_reason": record.finish_reason or None,
        "prompt_tokens": record.prompt_tokens,
        "cached_prompt_tokens": record.cached_prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "queue_s": round(record.queue_s, 6),
        "ttft_s": None if ttft is None else round(ttft, 6),
        "total_s": round(record.total_s, 6),
        "replica": record.replica or None,
    }
    if record.error:
        fields["error"] = record.error
    return fields


def log_request(record: RequestRecord) -> None:
    f = log_fields(record)
    ttft = "-" if f["ttft_s"] is None else f"{f['ttft_s']:.3f} s"
    outcome = f["status"] if not f["finish_reason"] else f"{f['status']} ({f['finish_reason']})"
    logger.info(
        "[%s] %s %s: %d prompt (%d cached) + %d completion tokens, "
        "queue %.3f s, ttft %s, total %.3f s, model %s%s%s",
        record.request_id,
        record.method,
        outcome,
        record.prompt_tokens,
        record.cached_prompt_tokens,
        record.completion_tokens,
        record.queue_s,
        ttft,
        f["total_s"],
        record.model,
        f", replica {record.replica}" if record.replica else "",
        f", error: {record.error}" if record.error else "",
        extra={"fields": f},
    )
