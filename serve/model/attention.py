"""Attention over a paged KV cache.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads,
head_dim]; a sequence's tokens live in the blocks its block table names, token
t at slot block_table[t // block_size] * block_size + t % block_size.

A step's tokens are ordered decode tokens first (one per decoding sequence),
then each prefilling sequence's chunk, contiguous. Decodes are attended in one
padded batch; each prefill chunk is attended on its own (no padding waste).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # index of the chunk's first token in the step
    num_tokens: int
    context_len: int  # tokens in the sequence's KV after this step
    block_table: torch.Tensor  # [num_blocks_of_seq] int64
    # Cache slots of the chunk's whole context, built by the first layer that needs them.
    _context_slots: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def context_slots(self, block_size: int) -> torch.Tensor:
        """Slots of tokens [0, context_len): [context_len] int64, the same for every layer."""
        if self._context_slots is None:
            pos = torch.arange(self.context_len)
            self._context_slots = _slots(self.block_table, pos, block_size)
        return self._context_slots


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, where each token's K/V are written
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, zero padded
    decode_context_lens: torch.Tensor  # [num_decodes] int64
    prefills: list[PrefillChunk]
    block_size: int
    # Per sliding window: the decode gather slots and mask, shared by every layer of a step.
    _decode_index: dict[int | None, tuple[int, torch.Tensor | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def decode_index(self, sliding_window: int | None) -> tuple[int, torch.Tensor | None]:
        """The longest decode context, and which of its positions each decode token
        attends to ([nd, 1, 1, longest] bool; None when every position counts: one
        sequence without a window). Built once per step."""
        cached = self._decode_index.get(sliding_window)
        if cached is not None:
            return cached
        lens = self.decode_context_lens  # [nd]
        max_len = int(lens.max())
        pos = torch.arange(max_len)
        mask: torch.Tensor | None = None
        if self.num_decode_tokens > 1 or sliding_window is not None:
            m = pos[None, :] < lens[:, None]  # [nd, max_len]
            if sliding_window is not None:
                m &= pos[None, :] >= (lens[:, None] - sliding_window)
            mask = m[:, None, None, :]
        self._decode_index[sliding_window] = (max_len, mask)
        return max_len, mask


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Stores this step's keys and values ([num_tokens, kv_heads, head_dim])."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def _gather(kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at the given slots: [..., kv_heads, head_dim] each."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    kv = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)[:, slots]
    return kv[0], kv[1]


def _gather_blocks(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first `length` tokens of each sequence, copied a whole
    block at a time: [num_seqs, length, kv_heads, head_dim] each."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    nb = -(-length // block_size)
    seqs = block_tables.shape[0]
    blocks = block_tables[:, :nb].reshape(-1)
    kv = kv_cache.view(2, num_blocks, -1).index_select(1, blocks)  # [2, seqs * nb, block]
    kv = kv.view(2, seqs, nb * block_size, kv_heads, head_dim)[:, :, :length]
    return kv[0], kv[1]


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return block_table[..., positions // block_size] * block_size + positions % block_size


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's cached KV.

    Returns [num_tokens, num_heads, head_dim]. Keys/values of this step must
    already be written (write_kv)."""
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    kv_heads = kv_cache.shape[3]
    gqa = num_heads != kv_heads
    nd = meta.num_decode_tokens
    if nd:
        max_len, mask = meta.decode_index(sliding_window)
        k, v = _gather_blocks(kv_cache, meta.decode_block_tables, max_len)  # [nd, max_len, kvh, d]
        qd = q[:nd].unsqueeze(2)  # [nd, heads, 1, d]
        o = F.scaled_dot_product_attention(
            qd,
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=scale,
            enable_gqa=gqa,
        )
        out[:nd] = o.squeeze(2)
    for chunk in meta.prefills:
        s, n, ctx = chunk.start, chunk.num_tokens, chunk.context_len
        k, v = _gather(kv_cache, chunk.context_slots(meta.block_size))  # [ctx, kvh, d]
        qc = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        kc = k.transpose(0, 1).unsqueeze(0)
        vc = v.transpose(0, 1).unsqueeze(0)
        if ctx == n and sliding_window is None:
            o = F.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            pos = torch.arange(ctx)
            q_pos = torch.arange(ctx - n, ctx)
            mask = pos[None, :] <= q_pos[:, None]  # [n, ctx]
            if sliding_window is not None:
                mask &= pos[None, :] > (q_pos[:, None] - sliding_window)
            o = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        out[s : s + n] = o.squeeze(0).transpose(0, 1)
    return out
