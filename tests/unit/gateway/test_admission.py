"""serve.gateway.admission: each bad input is refused with the right error and a
message naming the field; good input gets its defaults."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from serve.config import GatewayConfig
from serve.errors import InvalidArgument, NotFound, ResourceExhausted, ShardwireError
from serve.gateway import admission
from serve.gateway.admission import Limits, ModelLimits, SamplingParams

LIMITS = Limits.from_config(GatewayConfig(default_max_tokens=64, max_tokens_limit=1000))
MODEL = ModelLimits(vocab_size=264, max_model_len=100)


def _refused(
    error: type[ShardwireError], pattern: str, fn: Callable[..., object], *args: object
) -> ShardwireError:
    with pytest.raises(error, match=pattern) as info:
        fn(*args)
    return info.value


def test_sampling_defaults_are_filled() -> None:
    s = admission.validate_sampling(SamplingParams(), LIMITS)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (64, 1.0, 1.0, 0, None)


def test_valid_sampling_is_kept() -> None:
    raw = SamplingParams(max_tokens=1000, temperature=0.0, top_p=1.0, top_k=5, seed=7, stop=("x",))
    assert admission.validate_sampling(raw, LIMITS) == raw


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (SamplingParams(max_tokens=0), r"sampling\.max_tokens must be in \[1, 1000\], got 0"),
        (SamplingParams(max_tokens=1001), r"sampling\.max_tokens .* got 1001"),
        (SamplingParams(temperature=-0.5), r"sampling\.temperature must be >= 0, got -0.5"),
        (SamplingParams(temperature=math.nan), r"sampling\.temperature"),
        (SamplingParams(temperature=math.inf), r"sampling\.temperature"),
        (SamplingParams(top_p=0.0), r"sampling\.top_p must be in \(0, 1\], got 0"),
        (SamplingParams(top_p=1.5), r"sampling\.top_p must be in \(0, 1\], got 1.5"),
        (SamplingParams(top_p=math.nan), r"sampling\.top_p"),
        (SamplingParams(stop=("a", "")), r"sampling\.stop\[1\] must not be empty"),
        (SamplingParams(stop=("x" * 257,)), r"sampling\.stop\[0\] is 257 characters"),
        (SamplingParams(stop=("s",) * 17), r"sampling\.stop has 17 strings"),
    ],
)
def test_bad_sampling_is_refused(raw: SamplingParams, pattern: str) -> None:
    err = _refused(InvalidArgument, pattern, admission.validate_sampling, raw, LIMITS)
    assert err.code == "INVALID_ARGUMENT"


def test_empty_messages_are_refused() -> None:
    _refused(InvalidArgument, "messages must not be empty", admission.validate_messages, [])


def test_unknown_role_names_its_index() -> None:
    messages = [("system", "s"), ("user", "u"), ("robot", "r")]
    _refused(
        InvalidArgument,
        r"messages\[2\]\.role .* got 'robot'",
        admission.validate_messages,
        messages,
    )


def test_messages_become_domain_values() -> None:
    out = admission.validate_messages([("user", "hi"), ("assistant", "")])
    assert [(m.role, m.content) for m in out] == [("user", "hi"), ("assistant", "")]


def test_prompt_or_token_ids_exactly_one() -> None:
    _refused(InvalidArgument, "not both", admission.validate_prompt_choice, "hi", [1])
    _refused(InvalidArgument, "one of prompt", admission.validate_prompt_choice, "", [])
    admission.validate_prompt_choice("hi", [])
    admission.validate_prompt_choice("", [1, 2])


def test_empty_translation_text_is_refused() -> None:
    _refused(InvalidArgument, "text must not be empty", admission.validate_text, "", "text")


def test_unknown_model_is_not_found() -> None:
    err = _refused(NotFound, "'big'.*tiny", admission.resolve_model, "big", ["tiny"])
    assert err.code == "NOT_FOUND"
    assert admission.resolve_model("", ["tiny"]) == "tiny"
    assert admission.resolve_model("tiny", ["tiny"]) == "tiny"


def test_request_too_large_is_resource_exhausted() -> None:
    err = _refused(
        ResourceExhausted, "larger than the limit", admission.check_request_size, 2 << 20, LIMITS
    )
    assert err.code == "RESOURCE_EXHAUSTED"
    admission.check_request_size(1 << 20, LIMITS)


def test_token_ids_outside_vocabulary_name_the_index() -> None:
    sampling = admission.validate_sampling(SamplingParams(), LIMITS)
    _refused(
        InvalidArgument,
        r"prompt_token_ids\[1\] = 264 is outside the vocabulary \[0, 264\)",
        admission.admit,
        "r",
        [5, 264],
        sampling,
        MODEL,
        "prompt_token_ids",
    )


def test_prompt_filling_the_context_is_refused() -> None:
    sampling = admission.validate_sampling(SamplingParams(), LIMITS)
    _refused(
        InvalidArgument,
        "messages is too long: 100 prompt tokens, the model's context is 100",
        admission.admit,
        "r",
        [1] * 100,
        sampling,
        MODEL,
        "messages",
    )
    _refused(
        InvalidArgument,
        "prompt must not be empty",
        admission.admit,
        "r",
        [],
        sampling,
        MODEL,
        "prompt",
    )


def test_max_tokens_is_clamped_to_the_room_left() -> None:
    sampling = admission.validate_sampling(SamplingParams(max_tokens=50), LIMITS)
    admitted = admission.admit("r", [1] * 90, sampling, MODEL, "prompt")
    assert admitted.sampling.max_tokens == 10
    assert admitted.prompt_token_ids == (1,) * 90
    roomy = admission.admit("r", [1] * 10, sampling, MODEL, "prompt")
    assert roomy.sampling.max_tokens == 50
