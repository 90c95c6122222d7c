"""The step plan: everything a rank needs to run one forward pass, as tensors.

The leader packs a plan into one int64 tensor (a fixed header, then the
fields back to back) and the other ranks unpack it; nothing is pickled.

Header (int64 each): version, num_tokens t, decode tokens nd, decode table width w,
prefill chunks np, sampled rows ns, block size, payload length, taps nt. Payload,
in order: input ids [t], positions [t], slot mapping [t], decode block tables
[nd * w], decode context lengths [nd], per prefill chunk (start, tokens, context
length, table length) [np * 4], the prefill block tables back to back, sample
indices [ns], per tap (row, first token, end token) [nt * 3].

A tap asks every rank to hand over its KV heads of tokens [first, end) of one
sequence of the step right after each layer has written them (disaggregated
prefill on a TP replica: the leader gathers the heads and streams each layer's
KV while the next layers compute). Its row names the sequence: decode row r < nd,
or prefill chunk r - nd.

A receiving rank refuses (`PlanError`) before allocating anything sized by the
header: counts out of range, a payload length that does not match the fields, and
sizes past fixed bounds; then, on the received payload, anything the forward pass
would index with: decode tokens first and prefill chunks contiguous after them,
context lengths that their block tables cannot hold, positions that do not follow
from the context lengths, sample indices outside the step, and negative ids. With
`PlanLimits` (the rank's own model and KV pool) token ids, block ids, slots and
positions must also fall inside them, so a plan that passes runs without an
indexing error. A tap must name a row of the step and tokens its context holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serve.errors import InvalidArgument
from serve.model.attention import AttentionMetadata, PrefillChunk

PLAN_VERSION = 2
HEADER_LEN = 9
# Bounds a receiving rank accepts (far above any real step).
MAX_PLAN_TOKENS = 1 << 20
MAX_PLAN_INTS = 1 << 26
MAX_BLOCK_SIZE = 1 << 12
MAX_BLOCKS_PER_SEQ = 1 << 20
MAX_CONTEXT_LEN = 1 << 22
# Decode attention gathers [num_decodes, longest context] keys and values.
MAX_DECODE_GATHER = 1 << 26


class PlanError(InvalidArgument):
    """A step plan that is refused; the message says why."""


@dataclass(frozen=True)
class PlanLimits:
    """What a receiving rank's own model and KV pool allow."""

    vocab_size: int
    num_blocks: int
    block_size: int
    max_model_len: int
    num_layers: int = 0


@dataclass(frozen=True)
class PlanTap:
    """Tokens [start, stop) of the step's sequence `row` (decode row, or prefill
    chunk row - num decodes), whose KV every rank hands over layer by layer."""

    row: int
    start: int
    stop: int


@dataclass
class StepPlan:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are sampled.
    sample_indices: torch.Tensor  # [num_samples] int64
    taps: list[PlanTap] = field(default_factory=list)

    def tap_table(self, tap: PlanTap) -> list[int]:
        """The block table of a tap's sequence."""
        nd = self.meta.num_decode_tokens
        if tap.row < nd:
            return self.meta.decode_block_tables[tap.row].tolist()
        return self.meta.prefills[tap.row - nd].block_table.tolist()


def pack(plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(header [HEADER_LEN], payload [n]) int64 tensors."""
    m = plan.meta
    nd = m.num_decode_tokens
    width = m.decode_block_tables.shape[1] if nd else 0
    prefill_info = [
        (c.start, c.num_tokens, c.context_len, c.block_table.numel()) for c in m.prefills
    ]
    parts = [
        plan.input_ids,
        plan.positions,
        m.slot_mapping,
        m.decode_block_tables.reshape(-1)[: nd * width],
        m.decode_context_lens,
        torch.tensor(prefill_info, dtype=torch.long).reshape(-1),
        *(c.block_table for c in m.prefills),
        plan.sample_indices,
        torch.tensor([(t.row, t.start, t.stop) for t in plan.taps], dtype=torch.long),
    ]
    payload = torch.cat([p.to(torch.long).reshape(-1) for p in parts])
    header = torch.tensor(
        [PLAN_VERSION, plan.input_ids.numel(), nd, width, len(m.prefills),
         plan.sample_indices.numel(), m.block_size, payload.numel(), len(plan.taps)],
        dtype=torch.long,
    )  # fmt: skip
    return header, payload


def _fixed_ints(t: int, nd: int, width: int, np_: int, ns: int, nt: int) -> int:
    """Payload ints of every field but the prefill block tables."""
    return 3 * t + nd * width + nd + 4 * np_ + ns + 3 * nt


def check_header(header: torch.Tensor, limits: PlanLimits | None = None) -> int:
    """Validates a received header; returns the payload length to receive."""
    if header.dtype != torch.long or header.shape != (HEADER_LEN,):
        raise PlanError(f"step plan header must be {HEADER_LEN} int64, got {header.dtype}")
    version, t, nd, width, np_, ns, block_size, length, nt = header.tolist()
    if version != PLAN_VERSION:
        raise PlanError(f"step plan version {version}, expected {PLAN_VERSION}")
    if not (0 <= t <= MAX_PLAN_TOKENS and 0 <= nd <= t and 0 <= np_ <= t - nd and 0 <= ns <= t):
        raise PlanError(
            f"step plan header has impossible counts: {t} tokens, {nd} decodes, "
            f"{np_} prefill chunks, {ns} samples"
        )
    if not 0 <= nt <= nd + np_:
        raise PlanError(f"step plan has {nt} taps for {nd + np_} sequences")
    if not (0 <= width <= MAX_BLOCKS_PER_SEQ and (width > 0 or nd == 0)):
        raise PlanError(f"step plan decode table width {width} is impossible for {nd} decodes")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise PlanError(f"step plan block size {block_size} is out of range")
    if limits is not None and block_size != limits.block_size:
        raise PlanError(f"step plan block size {block_size}, this rank's is {limits.block_size}")
    if nd * width > MAX_PLAN_INTS:
        raise PlanError(f"step plan decode tables of {nd} x {width} are too large")
    fixed = _fixed_ints(t, nd, width, np_, ns, nt)
    if not fixed <= length <= MAX_PLAN_INTS or length - fixed > np_ * MAX_BLOCKS_PER_SEQ:
        raise PlanError(f"step plan payload of {length} ints does not fit its header")
    return length


def unpack(
    header: torch.Tensor, payload: torch.Tensor, limits: PlanLimits | None = None
) -> StepPlan:
    """The plan in a received (header, payload); PlanError if anything is off."""
    length = check_header(header, limits)
    _, t, nd, width, np_, ns, block_size, _, nt = header.tolist()
    if payload.dtype != torch.long or payload.dim() != 1:
        raise PlanError(f"step plan payload must be flat int64, got {payload.dtype}")
    if payload.numel() != length:
        raise PlanError(f"step plan payload has {payload.numel()} ints, header says {length}")
    pos = 0

    def take(n: int) -> torch.Tensor:
        nonlocal pos
        if n < 0 or pos + n > length:
            raise PlanError("step plan payload is shorter than its fields")
        out = payload[pos : pos + n]
        pos += n
        return out

    input_ids, positions, slots = take(t), take(t), take(t)
    decode_tables = take(nd * width).view(nd, width)
    decode_lens = take(nd)
    info = take(np_ * 4).view(np_, 4).tolist()
    chunks = [_prefill_chunk(i, row, take, block_size) for i, row in enumerate(info)]
    samples = take(ns)
    taps = [PlanTap(*row) for row in take(nt * 3).view(nt, 3).tolist()]
    if pos != length:
        raise PlanError("step plan payload is longer than its fields")
    expected_start = nd
    for i, chunk in enumerate(chunks):
        if chunk.start != expected_start:
            raise PlanError(f"prefill chunk {i} starts at {chunk.start}, expected {expected_start}")
        expected_start += chunk.num_tokens
    if expected_start != t:
        raise PlanError(f"decodes and prefill chunks hold {expected_start} tokens, header says {t}")
    _check_decodes(decode_lens, width, block_size)
    _check_positions(positions, nd, decode_lens, chunks)
    _check_range(samples, t, "sample indices")
    _check_range(input_ids, MAX_PLAN_INTS if limits is None else limits.vocab_size, "token ids")
    max_block = MAX_PLAN_INTS if limits is None else limits.num_blocks
    _check_range(decode_tables, max_block, "decode block ids")
    for i, chunk in enumerate(chunks):
        _check_range(chunk.block_table, max_block, f"prefill chunk {i} block ids")
    _check_range(slots, max_block * block_size, "slots")
    if limits is not None:
        _check_range(positions, limits.max_model_len, "positions")
    context = decode_lens.tolist() + [c.context_len for c in chunks]
    for i, tap in enumerate(taps):
        _check_tap(i, tap, context)
    meta = AttentionMetadata(slots, nd, decode_tables, decode_lens, chunks, block_size)
    return StepPlan(input_ids, positions, meta, samples, taps)


def _check_tap(i: int, tap: PlanTap, context: list[int]) -> None:
    """A tap names a sequence of the step and tokens whose KV the step leaves written."""
    if not 0 <= tap.row < len(context):
        raise PlanError(f"tap {i} names row {tap.row} of a step of {len(context)} sequences")
    if not 0 <= tap.start < tap.stop <= context[tap.row]:
        raise PlanError(
            f"tap {i}: tokens [{tap.start}, {tap.stop}) of a context of {context[tap.row]}"
        )


def _prefill_chunk(
    i: int, row: list[int], take: Callable[[int], torch.Tensor], block_size: int
) -> PrefillChunk:
    start, n, ctx, table_len = row
    if not (n >= 1 and n <= ctx <= MAX_CONTEXT_LEN and 0 <= table_len <= MAX_BLOCKS_PER_SEQ):
        raise PlanError(
            f"prefill chunk {i} has impossible sizes: {n} tokens, context {ctx}, "
            f"table of {table_len} blocks"
        )
    if ctx > table_len * block_size:
        raise PlanError(
            f"prefill chunk {i}: context of {ctx} tokens does not fit {table_len} blocks"
        )
    return PrefillChunk(start, n, ctx, take(table_len))


def _check_decodes(lens: torch.Tensor, width: int, block_size: int) -> None:
    if not lens.numel():
        return
    low, high = int(lens.min()), int(lens.max())
    if low < 1 or high > min(width * block_size, MAX_CONTEXT_LEN):
        raise PlanError(
            f"decode context lengths in [{low}, {high}] do not fit tables of {width} blocks"
        )
    if lens.numel() * high > MAX_DECODE_GATHER:
        raise PlanError(f"{lens.numel()} decodes of up to {high} tokens are too many")


def _check_positions(
    positions: torch.Tensor, nd: int, decode_lens: torch.Tensor, chunks: list[PrefillChunk]
) -> None:
    """Decode tokens sit at context length - 1, a prefill chunk's tokens are the
    last `num_tokens` of its context."""
    if nd and not torch.equal(positions[:nd], decode_lens - 1):
        raise PlanError("decode positions do not match their context lengths")
    for i, c in enumerate(chunks):
        got = positions[c.start : c.start + c.num_tokens]
        want = torch.arange(c.context_len - c.num_tokens, c.context_len, dtype=torch.long)
        if not torch.equal(got, want):
            raise PlanError(f"prefill chunk {i} positions do not match its context")


def _check_range(values: torch.Tensor, end: int, what: str) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= end):
        raise PlanError(f"step plan {what} must be in [0, {end})")
