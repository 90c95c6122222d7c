"""Attention over a paged KV cache.

The KV cache of one layer is a tensor [2, num_blocks, block_size, num_kv_heads,
head_dim]; a sequence's tokens live in the blocks its block table names, token
t at slot block_table[t // block_size] * block_size + t % block_size.

A step's tokens are ordered decode tokens first (one per decoding sequence),
then each prefilling sequence's chunk, contiguous. Decodes are attended in one
padded batch; each prefill chunk is attended on its own (no padding waste).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    start: int  # index of the chunk's first token in the step
    num_tokens: int
    context_len: int  # tokens in the sequence's KV after this step
    block_table: torch.Tensor  # [num_blocks_of_seq] int64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, where each token's K/V are written
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, zero padded
    decode_context_lens: torch.Tensor  # [num_decodes] int64
    prefills: list[PrefillChunk]
    block_size: int


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
        lens = meta.decode_context_lens  # [nd]
        max_len = int(lens.max())
        pos = torch.arange(max_len)
        slots = _slots(meta.decode_block_tables, pos, meta.block_size)  # [nd, max_len]
        k, v = _gather(kv_cache, slots)  # [nd, max_len, kv_heads, d]
        mask = pos[None, :] < lens[:, None]  # [nd, max_len]
        if sliding_window is not None:
            mask &= pos[None, :] >= (lens[:, None] - sliding_window)
        qd = q[:nd].unsqueeze(2)  # [nd, heads, 1, d]
        o = F.scaled_dot_product_attention(
            qd,
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=scale,
            enable_gqa=gqa,
        )
        out[:nd] = o.squeeze(2)
    for chunk in meta.prefills:
        s, n, ctx = chunk.start, chunk.num_tokens, chunk.context_len
        pos = torch.arange(ctx)
        k, v = _gather(kv_cache, _slots(chunk.block_table, pos, meta.block_size))  # [ctx, kvh, d]
        qc = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        kc = k.transpose(0, 1).unsqueeze(0)
        vc = v.transpose(0, 1).unsqueeze(0)
        if ctx == n and sliding_window is None:
            o = F.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, scale=scale, enable_gqa=gqa
            )
        else:
            q_pos = torch.arange(ctx - n, ctx)
            mask = pos[None, :] <= q_pos[:, None]  # [n, ctx]
            if sliding_window is not None:
                mask &= pos[None, :] > (q_pos[:, None] - sliding_window)
            o = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        out[s : s + n] = o.squeeze(0).transpose(0, 1)
    return out
