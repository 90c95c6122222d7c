"""Request validation: client input -> validated domain values, or a domain error
whose message names the offending field; and the overload gate (`LoadGate`).

Error messages quote client text only clipped (`clip`): a status message travels
in an HTTP/2 trailer, and one of a megabyte would be dropped by the client's
metadata limit, hiding the real error."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from serve.config import GatewayConfig
from serve.errors import InvalidArgument, NotFound, ResourceExhausted
from serve.gateway.prompts import ChatMessage

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
# Client text quoted in an error message is cut to this many characters.
MAX_QUOTED_CHARS = 64
# Identifiers a client passes back to us (session ids are 32 hex digits) and
# language codes; longer ones cannot be valid.
MAX_SESSION_ID_CHARS = 128
MAX_LANGUAGE_CODE_CHARS = 32


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; None means "the server default" until validated."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Limits:
    """The gateway's request limits."""

    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    max_request_bytes: int = 1 << 20
    # Messages of one Chat request (each costs template work before tokenizing).
    max_messages: int = 4096
    # Overload caps (LoadGate); 0: no cap.
    max_concurrent_streams: int = 256
    max_queued_prompt_tokens: int = 65536

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Limits:
        return cls(
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            max_stop_strings=config.max_stop_strings,
            max_stop_string_len=config.max_stop_string_len,
            max_request_bytes=config.max_request_bytes,
            max_concurrent_streams=config.max_concurrent_streams,
            max_queued_prompt_tokens=config.max_queued_prompt_tokens,
        )


@dataclass(frozen=True)
class ModelLimits:
    """What the replica reports about its model."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class AdmittedRequest:
    """A request ready for a replica: prompt ids in range, max_tokens fitting the context."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


def validate_sampling(raw: SamplingParams, limits: Limits) -> SamplingParams:
    """Checks ranges and fills the defaults (max_tokens, temperature 1, top_p 1)."""
    max_tokens = limits.default_max_tokens if raw.max_tokens is None else raw.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidArgument(
            f"sampling.max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}"
        )
    temperature = 1.0 if raw.temperature is None else raw.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be >= 0, got {temperature:g}")
    top_p = 1.0 if raw.top_p is None else raw.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {top_p:g}")
    if raw.top_k < 0:
        raise InvalidArgument(f"sampling.top_k must be >= 0, got {raw.top_k}")
    if len(raw.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            f"sampling.stop has {len(raw.stop)} strings, at most {limits.max_stop_strings} allowed"
        )
    for i, stop in enumerate(raw.stop):
        if not stop:
            raise InvalidArgument(f"sampling.stop[{i}] must not be empty")
        if len(stop) > limits.max_stop_string_len:
            raise InvalidArgument(
                f"sampling.stop[{i}] is {len(stop)} characters long, "
                f"at most {limits.max_stop_string_len} allowed"
            )
    return replace(raw, max_tokens=max_tokens, temperature=temperature, top_p=top_p)


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` quoted for an error message, cut to `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def validate_messages(
    messages: Sequence[tuple[str, str]], max_messages: int = Limits.max_messages
) -> tuple[ChatMessage, ...]:
    """A conversation of (role, content) pairs with known roles."""
    if not messages:
        raise InvalidArgument("messages must not be empty")
    if len(messages) > max_messages:
        raise InvalidArgument(
            f"messages holds {len(messages)} messages, at most {max_messages} allowed"
        )
    for i, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {clip(role)}"
            )
    return tuple(ChatMessage(role, content) for role, content in messages)


def validate_session_id(session_id: str) -> str:
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidArgument(
            f"session_id {clip(session_id)} is longer than {MAX_SESSION_ID_CHARS} characters"
        )
    return session_id


def validate_language_code(code: str, field: str) -> str:
    """Refuses codes too long to be any language code (the name is checked later)."""
    if len(code) > MAX_LANGUAGE_CODE_CHARS:
        raise InvalidArgument(
            f"{field} must be an ISO 639-1 language code such as 'en' or 'de', got {clip(code)}"
        )
    return code


def validate_text(text: str, field: str) -> str:
    if not text:
        raise InvalidArgument(f"{field} must not be empty")
    return text


def validate_prompt_choice(prompt: str, prompt_token_ids: Sequence[int]) -> None:
    """Generate takes prompt text or prompt token ids, exactly one of them."""
    if prompt and prompt_token_ids:
        raise InvalidArgument("set either prompt or prompt_token_ids, not both")
    if not prompt and not prompt_token_ids:
        raise InvalidArgument("one of prompt or prompt_token_ids must be set")


def resolve_model(requested: str, served: Sequence[str]) -> str:
    """The served model a request names; empty means the default (first) one."""
    if not requested:
        return served[0]
    if requested not in served:
        raise NotFound(f"model {clip(requested)} is not served here (serving: {', '.join(served)})")
    return requested


def check_request_size(num_bytes: int, limits: Limits) -> None:
    if num_bytes > limits.max_request_bytes:
        raise ResourceExhausted(
            f"request is {num_bytes} bytes, larger than the limit of {limits.max_request_bytes}"
        )


def admit(
    request_id: str,
    prompt_token_ids: Sequence[int],
    sampling: SamplingParams,
    model: ModelLimits,
    field: str,
) -> AdmittedRequest:
    """Checks the prompt against the model and clamps max_tokens to the room left in the
    context (generation then ends with finish reason LENGTH)."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise InvalidArgument(f"{field} must not be empty")
    if num_prompt >= model.max_model_len:
        raise InvalidArgument(
            f"{field} is too long: {num_prompt} prompt tokens, the model's context is "
            f"{model.max_model_len} tokens"
        )
    for i, token_id in enumerate(prompt_token_ids):
        if not 0 <= token_id < model.vocab_size:
            raise InvalidArgument(
                f"prompt_token_ids[{i}] = {token_id} is outside the vocabulary "
                f"[0, {model.vocab_size})"
            )
    room = model.max_model_len - num_prompt
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
    return AdmittedRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt_token_ids),
        sampling=replace(sampling, max_tokens=min(max_tokens, room)),
    )


# -- overload ---------------------------------------------------------------------------

# Trailing metadata key of the hint sent with an overload refusal.
RETRY_AFTER_KEY = "retry-after-ms"
DEFAULT_RETRY_AFTER_MS = 500
MIN_RETRY_AFTER_MS = 50
MAX_RETRY_AFTER_MS = 30_000
# Weight of the newest sample in the moving averages behind the hint.
EWMA_WEIGHT = 0.2


class Overloaded(ResourceExhausted):
    """Refused for the load of the gateway, not for what the request asks: worth
    sending again after `retry_after_ms`."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(f"{message}; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class QueuedPrompt:
    """One request's prompt tokens in the gateway's queue, from admission until
    its first token (or its end); `release` is idempotent."""

    def __init__(self, gate: LoadGate, num_tokens: int, since: float) -> None:
        self._gate = gate
        self.num_tokens = num_tokens
        self.since = since
        self.is_released = False

    def release(self, *, measured: bool = True) -> None:
        """Leaves the queue; `measured`: the wait ended with a first token, so it
        counts towards the retry-after hint."""
        if not self.is_released:
            self.is_released = True
            self._gate._dequeue(self, measured)


def _clamp_ms(seconds: float) -> int:
    return int(min(max(seconds * 1000.0, MIN_RETRY_AFTER_MS), MAX_RETRY_AFTER_MS))


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_WEIGHT * (sample - old)


class LoadGate:
    """Admission by load, checked before any costly work on a call.

    Two caps: inference streams in flight (`stream`, taken when a call arrives, so a
    refusal costs nothing but the check), and prompt tokens admitted but still
    waiting for their first token (`check_queue` before tokenizing, `queue_prompt`
    with the real count after). A prompt is admitted whenever the queue is empty,
    so one larger than the cap still runs (alone).

    The retry-after hint comes from moving averages of what was seen: a full set of
    streams frees a slot about every (mean stream duration / streams in flight);
    a full queue drains `excess` tokens in about (mean wait for the first token x
    excess / queued tokens). Until something was measured the hint is 500 ms; it
    is clamped to [50 ms, 30 s].

    Single-threaded: every method runs on the gateway's event loop."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.num_streams = 0
        self.queued_prompt_tokens = 0
        self.num_refused = 0
        self._mean_stream_s: float | None = None
        self._mean_wait_s: float | None = None

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Holds one stream slot for the body; Overloaded when none is free."""
        cap = self.limits.max_concurrent_streams
        if cap and self.num_streams >= cap:
            self.num_refused += 1
            raise Overloaded(
                f"the gateway is serving its maximum of {cap} streams",
                self.stream_retry_after_ms(),
            )
        self.num_streams += 1
        started = self._clock()
        try:
            yield
        finally:
            self.num_streams -= 1
            self._mean_stream_s = _ewma(self._mean_stream_s, self._clock() - started)

    def check_queue(self) -> None:
        """Overloaded when the prompt-token queue is already full (before tokenizing)."""
        cap = self.limits.max_queued_prompt_tokens
        if cap and self.queued_prompt_tokens >= cap:
            self._refuse_queue(0)

    def queue_prompt(self, num_tokens: int) -> QueuedPrompt:
        """Puts a tokenized prompt in the queue; Overloaded when it does not fit."""
        cap = self.limits.max_queued_prompt_tokens
        queued = self.queued_prompt_tokens
        if cap and queued and queued + num_tokens > cap:
            self._refuse_queue(num_tokens)
        self.queued_prompt_tokens += num_tokens
        return QueuedPrompt(self, num_tokens, self._clock())

    def stream_retry_after_ms(self) -> int:
        if self._mean_stream_s is None or not self.num_streams:
            return DEFAULT_RETRY_AFTER_MS
        return _clamp_ms(self._mean_stream_s / self.num_streams)

    def queue_retry_after_ms(self, num_tokens: int) -> int:
        queued = self.queued_prompt_tokens
        if self._mean_wait_s is None or not queued:
            return DEFAULT_RETRY_AFTER_MS
        excess = max(queued + num_tokens - self.limits.max_queued_prompt_tokens, 1)
        return _clamp_ms(self._mean_wait_s * min(excess / queued, 1.0))

    def _refuse_queue(self, num_tokens: int) -> None:
        self.num_refused += 1
        cap = self.limits.max_queued_prompt_tokens
        what = f"{num_tokens} more prompt tokens" if num_tokens else "more prompt tokens"
        raise Overloaded(
            f"{self.queued_prompt_tokens} prompt tokens wait for their first token, "
            f"{what} would pass the cap of {cap}",
            self.queue_retry_after_ms(num_tokens),
        )

    def _dequeue(self, entry: QueuedPrompt, measured: bool) -> None:
        self.queued_prompt_tokens -= entry.num_tokens
        if measured:
            self._mean_wait_s = _ewma(self._mean_wait_s, self._clock() - entry.since)
