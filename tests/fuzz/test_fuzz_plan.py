"""Fuzzing the step-plan decoder (serve.dist.plan) against the model runner that
executes what it accepts. Each test runs for its share of FUZZ_SECONDS.

Pass criterion: a received (header, payload) is either refused with PlanError or
unpacks into a plan that the runner of a rank with these limits (the tiny model,
24 KV blocks of 4 tokens, context 64) executes without any error, giving one row
of logits per sample index; valid plans round-trip exactly; no example takes 5 s
and peak resident memory grows by less than 64 MiB (a header may declare any
size)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from serve.config import EngineConfig
from serve.dist.plan import HEADER_LEN, PlanError, PlanLimits, StepPlan, check_header, pack, unpack
from serve.engine.runner import ModelRunner
from serve.model.attention import AttentionMetadata, PrefillChunk
from serve.model.loader import load_model
from tests.fuzz.budget import FUZZ, peak_rss_bytes, run_for, timeout_s

BLOCK = 4
NUM_BLOCKS = 24
MAX_LEN = 64
RSS_GROWTH_LIMIT = 64 << 20


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    torch.manual_seed(0)
    model = load_model("tiny")
    return ModelRunner(model, EngineConfig(block_size=BLOCK, num_kv_blocks=NUM_BLOCKS), NUM_BLOCKS)


@pytest.fixture(scope="module")
def limits(runner: ModelRunner) -> PlanLimits:
    vocab = runner.model.config.vocab_size
    return PlanLimits(
        vocab_size=vocab, num_blocks=NUM_BLOCKS, block_size=BLOCK, max_model_len=MAX_LEN
    )


@pytest.fixture(autouse=True)
def bounded_memory():
    before = peak_rss_bytes()
    yield
    assert peak_rss_bytes() - before < RSS_GROWTH_LIMIT


@st.composite
def plans(draw: st.DrawFn, vocab: int) -> StepPlan:
    """A consistent step: decodes first, then contiguous prefill chunks."""
    block_ids = st.integers(0, NUM_BLOCKS - 1)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    tables: list[list[int]] = []
    lens: list[int] = []
    for _ in range(draw(st.integers(0, 4))):
        ctx = draw(st.integers(1, MAX_LEN))
        table = draw(st.lists(block_ids, min_size=-(-ctx // BLOCK), max_size=-(-ctx // BLOCK)))
        p = ctx - 1
        ids.append(draw(st.integers(0, vocab - 1)))
        positions.append(p)
        slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
        tables.append(table)
        lens.append(ctx)
    nd = len(ids)
    width = max((len(t) for t in tables), default=1)
    chunks: list[PrefillChunk] = []
    for _ in range(draw(st.integers(0, 3))):
        n = draw(st.integers(1, 8))
        ctx = draw(st.integers(n, MAX_LEN))
        need = -(-ctx // BLOCK)
        table = draw(st.lists(block_ids, min_size=need, max_size=need + 1))
        chunks.append(PrefillChunk(len(ids), n, ctx, torch.tensor(table, dtype=torch.long)))
        for p in range(ctx - n, ctx):
            ids.append(draw(st.integers(0, vocab - 1)))
            positions.append(p)
            slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
    t = len(ids)
    samples = draw(st.lists(st.integers(0, t - 1), max_size=t)) if t else []
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decode_tokens=nd,
        decode_block_tables=torch.tensor(
            [tb + [0] * (width - len(tb)) for tb in tables], dtype=torch.long
        ).view(nd, width),
        decode_context_lens=torch.tensor(lens, dtype=torch.long),
        prefills=chunks,
        block_size=BLOCK,
    )
    return StepPlan(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
        meta,
        torch.tensor(samples, dtype=torch.long),
    )


def run_checked(runner: ModelRunner, limits: PlanLimits, header, payload) -> StepPlan | None:
    """What a receiving rank does: check, unpack, run. None when refused."""
    try:
        length = check_header(header, limits)
        if payload.numel() != length:
            return None
        plan = unpack(header, payload, limits)
    except PlanError:
        return None
    logits = runner.run(plan)
    assert logits.shape == (plan.sample_indices.numel(), limits.vocab_size)
    return plan


INTS = (
    st.integers(-2, 70)
    | st.sampled_from([-(2**63), -1, 2**31, 2**40, 2**62, 2**63 - 1])
    | st.integers(-(2**63), 2**63 - 1)
)


@pytest.mark.timeout(timeout_s("plan_mutated"))
def test_valid_and_mutated_plans(runner: ModelRunner, limits: PlanLimits) -> None:
    """Valid plans round-trip and run; with up to three ints of the header or payload
    changed (or the payload cut or extended) they are refused or still run."""

    @FUZZ
    @given(
        plan=plans(limits.vocab_size),
        header_edits=st.lists(st.tuples(st.integers(0, HEADER_LEN - 1), INTS), max_size=2),
        payload_edits=st.lists(st.tuples(st.integers(0, 1 << 12), INTS), max_size=3),
        resize=st.sampled_from([0, 0, 0, -1, 1, 5]),
    )
    def search(plan: StepPlan, header_edits, payload_edits, resize: int) -> None:
        header, payload = pack(plan)
        got = run_checked(runner, limits, header.clone(), payload.clone())
        assert got is not None, "a valid plan was refused"
        assert torch.equal(got.input_ids, plan.input_ids)
        assert torch.equal(got.positions, plan.positions)
        assert torch.equal(got.meta.slot_mapping, plan.meta.slot_mapping)
        for i, value in header_edits:
            header[i] = value
        if payload.numel():
            for i, value in payload_edits:
                payload[i % payload.numel()] = value
        if resize < 0:
            payload = payload[:resize]
        elif resize > 0:
            payload = torch.cat([payload, torch.zeros(resize, dtype=torch.long)])
            header[7] += resize
        run_checked(runner, limits, header, payload)

    run_for("plan_mutated", search)


@pytest.mark.timeout(timeout_s("plan_random"))
def test_random_headers_and_payloads(runner: ModelRunner, limits: PlanLimits) -> None:
    """Arbitrary headers (any int64 values) are refused or name a payload length
    within bounds; with a random payload of that length (when small), the plan is
    refused or runs."""

    @FUZZ
    @given(
        header=st.lists(INTS, min_size=HEADER_LEN, max_size=HEADER_LEN),
        version=st.sampled_from([1, 1, 1, 0, 2]),
        block=st.sampled_from([BLOCK, BLOCK, 1, 16]),
        fill=st.lists(st.integers(-1, 70), max_size=256),
    )
    def search(header: list[int], version: int, block: int, fill: list[int]) -> None:
        header[0], header[6] = version, block
        h = torch.tensor(header, dtype=torch.long)
        try:
            length = check_header(h, limits)
        except PlanError:
            return
        assert 0 <= length <= 1 << 26
        if length > 4096:
            return
        values = (fill * (length // max(len(fill), 1) + 1))[:length] if fill else [0] * length
        run_checked(runner, limits, h, torch.tensor(values, dtype=torch.long))

    run_for("plan_random", search)
