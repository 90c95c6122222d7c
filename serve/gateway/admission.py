"""Request validation: client input -> validated domain values, or a domain error
whose message names the offending field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from serve.config import GatewayConfig
from serve.errors import InvalidArgument, NotFound, ResourceExhausted
from serve.gateway.prompts import ChatMessage

CHAT_ROLES = ("system", "user", "assistant")


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

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Limits:
        return cls(
            default_max_tokens=config.default_max_tokens,
            max_tokens_limit=config.max_tokens_limit,
            max_stop_strings=config.max_stop_strings,
            max_stop_string_len=config.max_stop_string_len,
            max_request_bytes=config.max_request_bytes,
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


def validate_messages(messages: Sequence[tuple[str, str]]) -> tuple[ChatMessage, ...]:
    """A conversation of (role, content) pairs with known roles."""
    if not messages:
        raise InvalidArgument("messages must not be empty")
    for i, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
            )
    return tuple(ChatMessage(role, content) for role, content in messages)


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
        raise NotFound(f"model {requested!r} is not served here (serving: {', '.join(served)})")
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
