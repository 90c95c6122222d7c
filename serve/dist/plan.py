"""The step plan: everything a rank needs to run one forward pass, as tensors.

The leader packs a plan into one int64 tensor (a fixed header, then the
fields back to back) and the other ranks unpack it; nothing is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.errors import InvalidArgument
from serve.model.attention import AttentionMetadata, PrefillChunk

PLAN_VERSION = 1
HEADER_LEN = 8
# Bounds a receiving rank accepts (far above any real step).
MAX_PLAN_TOKENS = 1 << 20
MAX_PLAN_INTS = 1 << 26


@dataclass
class StepPlan:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Rows of the hidden states whose logits are sampled.
    sample_indices: torch.Tensor  # [num_samples] int64


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
    ]
    payload = torch.cat([p.to(torch.long).reshape(-1) for p in parts])
    header = torch.tensor(
        [PLAN_VERSION, plan.input_ids.numel(), nd, width, len(m.prefills),
         plan.sample_indices.numel(), m.block_size, payload.numel()],
        dtype=torch.long,
    )  # fmt: skip
    return header, payload


def check_header(header: torch.Tensor) -> int:
    """Validates a received header; returns the payload length to receive."""
    version, num_tokens, nd, width, np_, ns, block_size, length = header.tolist()
    if version != PLAN_VERSION:
        raise InvalidArgument(f"step plan version {version}, expected {PLAN_VERSION}")
    if not (
        0 <= num_tokens <= MAX_PLAN_TOKENS and 0 <= nd <= num_tokens and 0 <= np_ <= num_tokens
    ):
        raise InvalidArgument("step plan header has impossible token counts")
    if not (
        0 <= ns <= num_tokens and width >= 0 and block_size > 0 and 0 <= length <= MAX_PLAN_INTS
    ):
        raise InvalidArgument("step plan header has impossible sizes")
    return length


def unpack(header: torch.Tensor, payload: torch.Tensor) -> StepPlan:
    _, t, nd, width, np_, ns, block_size, length = header.tolist()
    if payload.numel() != length:
        raise InvalidArgument(f"step plan payload has {payload.numel()} ints, header says {length}")
    pos = 0

    def take(n: int) -> torch.Tensor:
        nonlocal pos
        if n < 0 or pos + n > length:
            raise InvalidArgument("step plan payload is shorter than its fields")
        out = payload[pos : pos + n]
        pos += n
        return out

    input_ids, positions, slots = take(t), take(t), take(t)
    decode_tables = take(nd * width).view(nd, width)
    decode_lens = take(nd)
    info = take(np_ * 4).view(np_, 4).tolist()
    chunks = [PrefillChunk(s, n, ctx, take(tl)) for s, n, ctx, tl in info]
    samples = take(ns)
    if pos != length:
        raise InvalidArgument("step plan payload is longer than its fields")
    meta = AttentionMetadata(slots, nd, decode_tables, decode_lens, chunks, block_size)
    return StepPlan(input_ids, positions, meta, samples)
