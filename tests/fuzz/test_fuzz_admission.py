"""Fuzzing the gateway's request validators (serve.gateway.admission) and its
overload gate. Each test runs for its share of FUZZ_SECONDS.

Pass criterion: any input is either refused with a ShardwireError whose message
stays short (quoted client text is clipped), or accepted with every documented
invariant holding (defaults filled, ranges respected, max_tokens fitting the
context); the gate never holds more than its caps, never refuses below them, and
its retry-after hints stay within [50 ms, 30 s]."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve.errors import ShardwireError
from serve.gateway import admission
from serve.gateway.admission import (
    CHAT_ROLES,
    MAX_RETRY_AFTER_MS,
    MIN_RETRY_AFTER_MS,
    Limits,
    LoadGate,
    ModelLimits,
    Overloaded,
    SamplingParams,
)
from tests.fuzz.budget import FUZZ, run_for, timeout_s

LIMITS = Limits(default_max_tokens=32, max_tokens_limit=512, max_messages=64)
# A refusal message: our words plus clipped quotes of client text.
MAX_MESSAGE_CHARS = 400

FLOATS = st.none() | st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.text(max_size=40) | st.text(min_size=1000, max_size=5000)


def refused_briefly(error: ShardwireError) -> None:
    assert len(error.message) < MAX_MESSAGE_CHARS, error.message[:200]


@pytest.mark.timeout(timeout_s("admission_sampling"))
def test_sampling() -> None:
    """Sampling parameters of any value: refused, or filled with values in range."""

    @FUZZ
    @given(
        max_tokens=st.none() | st.integers(0, 2**32 - 1),
        temperature=FLOATS,
        top_p=FLOATS,
        top_k=st.integers(0, 2**32 - 1),
        seed=st.none() | st.integers(0, 2**64 - 1),
        stop=st.lists(TEXT, max_size=20).map(tuple),
        ignore_eos=st.booleans(),
    )
    def search(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos) -> None:
        raw = SamplingParams(max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        try:
            s = admission.validate_sampling(raw, LIMITS)
        except ShardwireError as error:
            refused_briefly(error)
            return
        assert s.max_tokens is not None and 1 <= s.max_tokens <= LIMITS.max_tokens_limit
        assert s.temperature is not None and math.isfinite(s.temperature) and s.temperature >= 0
        assert s.top_p is not None and 0 < s.top_p <= 1
        assert len(s.stop) <= LIMITS.max_stop_strings
        assert all(0 < len(x) <= LIMITS.max_stop_string_len for x in s.stop)

    run_for("admission_sampling", search)


@pytest.mark.timeout(timeout_s("admission_prompts"))
def test_messages_ids_and_names() -> None:
    """Messages, prompt ids, model names, session ids and language codes of any
    value: refused briefly, or accepted within the model's limits."""
    roles = st.sampled_from(CHAT_ROLES) | TEXT

    @FUZZ
    @given(
        messages=st.lists(st.tuples(roles, TEXT), max_size=80),
        ids=st.lists(st.integers(-(2**33), 2**33), max_size=300),
        vocab=st.integers(1, 1000),
        max_len=st.integers(1, 400),
        max_tokens=st.none() | st.integers(1, 5000),
        model=TEXT,
        session_id=TEXT,
        code=TEXT,
    )
    def search(messages, ids, vocab, max_len, max_tokens, model, session_id, code) -> None:
        try:
            out = admission.validate_messages(messages, LIMITS.max_messages)
            assert 0 < len(out) <= LIMITS.max_messages
            assert all(m.role in CHAT_ROLES for m in out)
        except ShardwireError as error:
            refused_briefly(error)
        try:
            done = admission.admit(
                "r", ids, SamplingParams(max_tokens=max_tokens), ModelLimits(vocab, max_len), "f"
            )
            n = len(done.prompt_token_ids)
            assert 0 < n < max_len
            assert all(0 <= t < vocab for t in done.prompt_token_ids)
            assert done.sampling.max_tokens is not None
            assert 1 <= done.sampling.max_tokens <= max_len - n
        except ShardwireError as error:
            refused_briefly(error)
        for check in (
            lambda: admission.resolve_model(model, ["tiny"]),
            lambda: admission.validate_session_id(session_id),
            lambda: admission.validate_language_code(code, "target_lang"),
        ):
            try:
                check()
            except ShardwireError as error:
                refused_briefly(error)

    run_for("admission_prompts", search)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.timeout(timeout_s("admission_load_gate"))
def test_load_gate() -> None:
    """Any sequence of stream opens/closes, prompt queueing and releases, and clock
    steps: the gate holds at most its caps, refuses only at them, and hints within
    bounds."""
    ops = st.one_of(
        st.tuples(st.just("open"), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 50)),
        st.tuples(st.just("queue"), st.integers(0, 3000)),
        st.tuples(st.just("release"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.integers(0, 10_000)),
    )

    @FUZZ
    @given(
        max_streams=st.integers(0, 8),
        max_tokens=st.integers(0, 4000),
        steps=st.lists(ops, max_size=120),
    )
    def search(max_streams: int, max_tokens: int, steps) -> None:
        clock = FakeClock()
        limits = Limits(max_concurrent_streams=max_streams, max_queued_prompt_tokens=max_tokens)
        gate = LoadGate(limits, clock)
        streams = []
        queued = []
        for op, arg in steps:
            if op == "open":
                slot = gate.stream()
                before = gate.num_streams
                try:
                    slot.__enter__()
                    streams.append(slot)
                except Overloaded as error:
                    assert max_streams and before >= max_streams
                    assert MIN_RETRY_AFTER_MS <= error.retry_after_ms <= MAX_RETRY_AFTER_MS
            elif op == "close" and streams:
                streams.pop(arg % len(streams)).__exit__(None, None, None)
            elif op == "queue":
                before = gate.queued_prompt_tokens
                try:
                    gate.check_queue()
                    queued.append(gate.queue_prompt(arg))
                except Overloaded as error:
                    # full already (before tokenizing), or this prompt does not fit
                    assert max_tokens and (before >= max_tokens or before + arg > max_tokens)
                    assert before
                    assert MIN_RETRY_AFTER_MS <= error.retry_after_ms <= MAX_RETRY_AFTER_MS
            elif op == "release" and queued:
                entry = queued.pop(arg % len(queued))
                entry.release(measured=bool(arg % 2))
                entry.release()  # idempotent
            elif op == "tick":
                clock.now += arg / 1000
            assert gate.num_streams == len(streams)
            assert not max_streams or gate.num_streams <= max_streams
            assert gate.queued_prompt_tokens == sum(q.num_tokens for q in queued)
            big = max((q.num_tokens for q in queued), default=0)
            assert not max_tokens or gate.queued_prompt_tokens <= max(max_tokens, big)
        for slot in streams:
            slot.__exit__(None, None, None)
        for entry in queued:
            entry.release()
        assert gate.num_streams == 0 and gate.queued_prompt_tokens == 0

    run_for("admission_load_gate", search)
