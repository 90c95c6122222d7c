"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) with tensor-parallel layers.

Parameter names follow Hugging Face checkpoints, so weights load by name.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from serve.dist.group import ParallelGroup
from serve.model.attention import AttentionMetadata, paged_attention, write_kv
from serve.model.config import ModelConfig
from serve.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    fuse_rows,
    linear,
)
from serve.model.overlap import forward_overlapped, micro_chunk_bounds


def kv_head_piece(num_kv_heads: int, group: ParallelGroup) -> tuple[int, int]:
    """Which piece of the KV heads this rank holds: its own share when the KV
    heads divide among the ranks, else one head shared by tp / kv ranks (GQA
    with fewer KV heads than ranks: replicated)."""
    if num_kv_heads % group.size == 0:
        return group.rank, group.size
    if group.size % num_kv_heads:
        raise ValueError(
            f"KV heads ({num_kv_heads}) and TP size ({group.size}) must divide one another"
        )
    return group.rank // (group.size // num_kv_heads), num_kv_heads


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup, dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.head_dim
        self.num_heads = group.shard(cfg.num_heads, "attention heads")
        kv_piece = kv_head_piece(cfg.num_kv_heads, group)
        self.num_kv_heads = cfg.num_kv_heads // kv_piece[1]
        self.head_dim = d
        self.scale = d**-0.5
        self.sliding_window = cfg.sliding_window
        bias = cfg.attention_bias
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.num_heads * d, bias, group, dtype)
        kv = cfg.num_kv_heads * d
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv, bias, group, dtype, kv_piece)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv, bias, group, dtype, kv_piece)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, group, dtype)
        # q, k and v in one matmul (the three parameters are views into it).
        self.qkv_weight, self.qkv_bias = fuse_rows(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.o_proj.group.all_reduce(self.partial(x, rope, kv_cache, meta))

    def partial(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """This rank's share of the output [n, hidden], before the all-reduce."""
        n, h = x.shape[0], self.num_heads
        kvh = self.num_kv_heads
        qkv = linear(x, self.qkv_weight, self.qkv_bias).view(n, h + 2 * kvh, self.head_dim)
        qk = RotaryEmbedding.apply(qkv[:, : h + kvh], *rope)  # queries and keys rotate alike
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh :]
        write_kv(kv_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, kv_cache, meta, self.scale, self.sliding_window)  # [n, heads, d]
        return self.o_proj.partial(o.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup, dtype: torch.dtype) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = ColumnParallelLinear(h, i, False, group, dtype)
        self.up_proj = ColumnParallelLinear(h, i, False, group, dtype)
        self.down_proj = RowParallelLinear(i, h, group, dtype)
        # gate and up in one matmul (the two parameters are views into it).
        self.gate_up_weight, _ = fuse_rows(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.group.all_reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output [n, hidden], before the all-reduce."""
        gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return self.down_proj.partial(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, group: ParallelGroup, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, group, dtype)
        self.mlp = MLP(cfg, group, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, group: ParallelGroup, max_positions: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, group, dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, group, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # Called with each layer's index once the layer is done (its KV written),
        # while the next layers are still to run: taps of disaggregated prefill.
        self.after_layer: Callable[[int], None] | None = None

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        w = self.embed_tokens.weight  # [vocab_local, hidden]
        bounds = micro_chunk_bounds(meta, input_ids.numel(), self.group, w.shape[1], w.dtype)
        if bounds is not None:
            return forward_overlapped(self, input_ids, positions, kv_caches, meta, bounds)
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        rope = self.rotary.lookup(positions)
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x = layer(x, rope, kv_cache, meta)
            if self.after_layer is not None:
                self.after_layer(index)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        group: ParallelGroup | None = None,
        max_positions: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        group = group or ParallelGroup.single()
        self.config = cfg
        self.group = group
        self.dtype = dtype
        self.model = LlamaModel(cfg, group, max_positions or cfg.max_position_embeddings, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, group, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab] (full vocabulary on every rank)."""
        return self.lm_head(hidden).float()

    def init_random(self, seed: int) -> None:
        """Fills the weights from a fixed seed (the built-in presets).

        Each full tensor is drawn from its own generator (seed, parameter name)
        and this rank keeps its slice, so every TP size gives the same model."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
                continue
            if name.endswith("bias"):
                p.data.zero_()
                continue
            tp_dim = p.tp_dim  # type: ignore[attr-defined]
            index, count = p.tp_index, p.tp_count  # type: ignore[attr-defined]
            full = list(p.shape)
            if tp_dim is not None:
                full[tp_dim] *= count
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = 1.0 if "embed" in name else 0.02
            w = torch.randn(full, generator=gen) * std
            if tp_dim is not None:
                w = w.narrow(tp_dim, index * p.shape[tp_dim], p.shape[tp_dim])
            p.data.copy_(w)
