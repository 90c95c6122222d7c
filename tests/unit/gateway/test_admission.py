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


# -- overload gate --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stream_cap_refuses_with_a_hint_from_stream_durations() -> None:
    clock = Clock()
    gate = admission.LoadGate(Limits(max_concurrent_streams=2), clock)
    with gate.stream(), gate.stream():
        full = pytest.raises(admission.Overloaded, match="maximum of 2 streams")
        with full as info, gate.stream():
            pass
        assert info.value.retry_after_ms == admission.DEFAULT_RETRY_AFTER_MS
        assert info.value.code == "RESOURCE_EXHAUSTED"
        clock.now += 2.0
    assert gate.num_streams == 0
    with gate.stream(), gate.stream():
        # streams last 2 s on average and 2 are open: one frees about every second
        with pytest.raises(admission.Overloaded) as info, gate.stream():
            pass
        assert info.value.retry_after_ms == 1000
    assert gate.num_refused == 2


def test_a_slot_is_returned_when_the_call_fails() -> None:
    gate = admission.LoadGate(Limits(max_concurrent_streams=1))
    with pytest.raises(InvalidArgument), gate.stream():
        raise InvalidArgument("bad")
    with gate.stream():
        assert gate.num_streams == 1


def test_prompt_queue_cap() -> None:
    clock = Clock()
    gate = admission.LoadGate(Limits(max_queued_prompt_tokens=100), clock)
    big = gate.queue_prompt(500)  # an empty queue takes any prompt
    with pytest.raises(admission.Overloaded, match="500 prompt tokens wait"):
        gate.check_queue()  # full before tokenizing
    clock.now += 0.4
    big.release()
    big.release()  # idempotent
    assert gate.queued_prompt_tokens == 0
    first = gate.queue_prompt(60)
    with pytest.raises(admission.Overloaded, match="50 more prompt tokens") as info:
        gate.queue_prompt(50)
    # waits for a first token took 0.4 s; 10 of the 60 queued tokens must drain
    assert info.value.retry_after_ms == 66
    fits = gate.queue_prompt(40)
    assert gate.queued_prompt_tokens == 100
    first.release(measured=False)
    fits.release(measured=False)
    assert gate.queued_prompt_tokens == 0


def test_hints_are_clamped_and_caps_can_be_off() -> None:
    clock = Clock()
    gate = admission.LoadGate(Limits(max_concurrent_streams=1, max_queued_prompt_tokens=10), clock)
    with gate.stream():
        clock.now += 1000.0
    with gate.stream(), pytest.raises(admission.Overloaded) as info, gate.stream():
        pass
    assert info.value.retry_after_ms == admission.MAX_RETRY_AFTER_MS
    off = admission.LoadGate(Limits(max_concurrent_streams=0, max_queued_prompt_tokens=0))
    with off.stream(), off.stream(), off.stream():
        off.queue_prompt(10**9)
        off.queue_prompt(10**9)
        off.check_queue()


def test_quoted_client_text_is_clipped() -> None:
    err = _refused(
        InvalidArgument, "role must be one of", admission.validate_messages, [("x" * 10_000, "hi")]
    )
    assert len(err.message) < 300 and "10000 characters" in err.message
    err = _refused(NotFound, "not served here", admission.resolve_model, "m" * 10_000, ["tiny"])
    assert len(err.message) < 300
    _refused(InvalidArgument, "session_id", admission.validate_session_id, "s" * 129)
    _refused(InvalidArgument, "ISO 639-1", admission.validate_language_code, "e" * 33, "lang")
    four = [("user", "")] * 4
    _refused(InvalidArgument, "at most 3 allowed", admission.validate_messages, four, 3)
