"""serve.dist.plan: a packed step plan comes back equal, and every malformed header
or payload is refused with PlanError before anything sized by it is allocated."""

from __future__ import annotations

import pytest
import torch

from serve.dist.plan import (
    HEADER_LEN,
    MAX_PLAN_INTS,
    PlanError,
    PlanLimits,
    PlanTap,
    StepPlan,
    check_header,
    pack,
    unpack,
)
from serve.model.attention import AttentionMetadata, PrefillChunk

LIMITS = PlanLimits(vocab_size=100, num_blocks=16, block_size=4, max_model_len=64)


def make_plan() -> StepPlan:
    """Two decodes (contexts 5 and 9) and two prefill chunks (3 new of 7, 4 of 4);
    taps on the second decode (tokens 8..9) and the first chunk (tokens 0..7)."""
    bs = 4
    dec_tables = torch.tensor([[1, 2, 0], [3, 4, 5]])
    dec_lens = torch.tensor([5, 9])
    chunks = [
        PrefillChunk(start=2, num_tokens=3, context_len=7, block_table=torch.tensor([6, 7])),
        PrefillChunk(start=5, num_tokens=4, context_len=4, block_table=torch.tensor([8])),
    ]
    positions = torch.tensor([4, 8, 4, 5, 6, 0, 1, 2, 3])
    slots = torch.tensor([2 * bs + 0, 5 * bs + 0, 7 * bs, 7 * bs + 1, 7 * bs + 2, 32, 33, 34, 35])
    meta = AttentionMetadata(slots, 2, dec_tables, dec_lens, chunks, bs)
    ids = torch.arange(9) + 10
    taps = [PlanTap(1, 8, 9), PlanTap(2, 0, 7)]
    return StepPlan(ids, positions, meta, torch.tensor([0, 1, 4, 8]), taps)


def assert_same(a: StepPlan, b: StepPlan) -> None:
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.positions, b.positions)
    assert torch.equal(a.sample_indices, b.sample_indices)
    assert torch.equal(a.meta.slot_mapping, b.meta.slot_mapping)
    assert torch.equal(a.meta.decode_block_tables, b.meta.decode_block_tables)
    assert torch.equal(a.meta.decode_context_lens, b.meta.decode_context_lens)
    assert a.meta.block_size == b.meta.block_size
    assert [(c.start, c.num_tokens, c.context_len) for c in a.meta.prefills] == [
        (c.start, c.num_tokens, c.context_len) for c in b.meta.prefills
    ]
    for ca, cb in zip(a.meta.prefills, b.meta.prefills, strict=True):
        assert torch.equal(ca.block_table, cb.block_table)
    assert a.taps == b.taps


def test_round_trip() -> None:
    plan = make_plan()
    header, payload = pack(plan)
    assert check_header(header, LIMITS) == payload.numel()
    assert_same(unpack(header, payload, LIMITS), plan)
    assert_same(unpack(header, payload), plan)


def test_taps_name_their_block_tables() -> None:
    plan = unpack(*pack(make_plan()), LIMITS)
    assert [plan.tap_table(t) for t in plan.taps] == [[3, 4, 5], [6, 7]]


def edited(index: int, value: int, *, in_header: bool) -> tuple[torch.Tensor, torch.Tensor]:
    header, payload = pack(make_plan())
    (header if in_header else payload)[index] = value
    return header, payload


@pytest.mark.parametrize(
    ("index", "value", "pattern"),
    [
        (0, 1, "version"),
        (1, -1, "impossible counts"),
        (1, 1 << 40, "impossible counts"),
        (2, 10, "impossible counts"),
        (3, -1, "width"),
        (3, 1 << 40, "width"),
        (4, 9, "impossible counts"),
        (5, 10, "impossible counts"),
        (6, 0, "block size"),
        (6, 1 << 30, "block size"),
        (6, 8, "this rank's is 4"),
        (7, 1 << 40, "does not fit its header"),
        (7, 3, "does not fit its header"),
        (8, 5, "5 taps for 4 sequences"),
        (8, -1, "taps for"),
    ],
)
def test_bad_headers_are_refused(index: int, value: int, pattern: str) -> None:
    header, _ = edited(index, value, in_header=True)
    with pytest.raises(PlanError, match=pattern):
        check_header(header, LIMITS)


def test_header_of_the_wrong_type_or_shape() -> None:
    with pytest.raises(PlanError, match="int64"):
        check_header(torch.zeros(HEADER_LEN, dtype=torch.int32))
    with pytest.raises(PlanError, match="int64"):
        check_header(torch.zeros(HEADER_LEN + 1, dtype=torch.long))


def test_a_huge_declared_payload_is_refused_before_allocation() -> None:
    header, _ = pack(make_plan())
    header[7] = MAX_PLAN_INTS + 1
    with pytest.raises(PlanError):
        check_header(header)


# Payload layout of make_plan(): ids 0-8, positions 9-17, slots 18-26, decode tables
# 27-32, decode lens 33-34, prefill info 35-42, tables 43-45, samples 46-49, taps
# 50-55 (row, start, stop each).
@pytest.mark.parametrize(
    ("index", "value", "pattern"),
    [
        (0, -1, "token ids"),
        (0, 100, "token ids"),
        (9, 5, "decode positions"),
        (13, 9, "prefill chunk 0 positions"),
        (18, -3, "slots"),
        (18, 16 * 4, "slots"),
        (27, 16, "decode block ids"),
        (33, 0, "decode context lengths"),
        (33, 13, "decode context lengths"),
        (34, 1 << 40, "decode context lengths"),
        (35, 3, "starts at 3"),
        (36, 0, "impossible sizes"),
        (37, 2, "impossible sizes"),
        (37, 9, "does not fit 2 blocks"),
        (38, 5, "shorter than its fields"),
        (38, 1, "does not fit 1 blocks"),
        (43, -1, "block ids"),
        (46, 9, "sample indices"),
        (46, -1, "sample indices"),
        (50, 4, "tap 0 names row 4"),
        (50, -1, "tap 0 names row -1"),
        (51, 9, r"tap 0: tokens \[9, 9\)"),
        (51, -1, "tap 0: tokens"),
        (52, 10, r"tap 0: tokens \[8, 10\) of a context of 9"),
        (55, 8, r"tap 1: tokens \[0, 8\) of a context of 7"),
        (53, 3, r"tap 1: tokens \[0, 7\) of a context of 4"),
    ],
)
def test_bad_payloads_are_refused(index: int, value: int, pattern: str) -> None:
    header, payload = edited(index, value, in_header=False)
    with pytest.raises(PlanError, match=pattern):
        unpack(header, payload, LIMITS)


def test_limits_bound_positions() -> None:
    plan = make_plan()
    header, payload = pack(plan)
    small = PlanLimits(vocab_size=100, num_blocks=16, block_size=4, max_model_len=8)
    with pytest.raises(PlanError, match="positions"):
        unpack(header, payload, small)


def test_payload_of_the_wrong_length_or_type() -> None:
    header, payload = pack(make_plan())
    with pytest.raises(PlanError, match="header says"):
        unpack(header, payload[:-1], LIMITS)
    with pytest.raises(PlanError, match="flat int64"):
        unpack(header, payload.to(torch.int32), LIMITS)


def test_an_empty_step_round_trips() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    meta = AttentionMetadata(empty, 0, torch.zeros(0, 1, dtype=torch.long), empty, [], 4)
    plan = StepPlan(empty, empty, meta, empty)
    header, payload = pack(plan)
    out = unpack(header, payload, LIMITS)
    assert out.input_ids.numel() == 0 and out.meta.prefills == []


def test_trailing_ints_are_refused() -> None:
    header, payload = pack(make_plan())
    header[7] += 1
    with pytest.raises(PlanError, match="longer than its fields"):
        unpack(header, torch.cat([payload, torch.zeros(1, dtype=torch.long)]), LIMITS)
