"""Tensor-parallel building blocks. The TP math lives here: column-parallel
layers need no communication, row-parallel layers and the vocab embedding
all-reduce through the group, the LM head gathers logits.

Every parameter carries `tp_dim` (the dimension along which the full tensor is
split, None when replicated), `tp_index` and `tp_count` (this rank holds piece
tp_index of tp_count equal pieces). Usually the pieces are the ranks; KV
projections with fewer KV heads than ranks are split by head and each piece is
held by several ranks. The loader and the random initialiser slice with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from serve.dist.group import ParallelGroup
from serve.model.config import RopeScaling


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; one bfloat16 row (a single decode token) goes through the
    matrix-vector kernel, which streams the weight at memory speed where the
    matrix-matrix one takes about twice as long on CPU (6144x768: 369 against
    692 us). float32 is memory-bound either way and stays on F.linear."""
    if x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] == 1 and x.device.type == "cpu":
        if bias is None:
            return torch.mv(weight, x[0]).unsqueeze(0)
        return torch.addmv(bias, weight, x[0]).unsqueeze(0)
    return F.linear(x, weight, bias)


def _param(
    shape: tuple[int, ...],
    tp_dim: int | None,
    dtype: torch.dtype,
    piece: tuple[int, int] = (0, 1),
) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.tp_dim = tp_dim  # type: ignore[attr-defined]
    p.tp_index, p.tp_count = piece if tp_dim is not None else (0, 1)  # type: ignore[attr-defined]
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; each rank holds its slice of y."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group: ParallelGroup,
        dtype: torch.dtype,
        piece: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        index, count = piece or (group.rank, group.size)
        if out_features % count:
            raise ValueError(f"output features ({out_features}) do not split into {count} pieces")
        out_local = out_features // count
        self.weight = _param((out_local, in_features), 0, dtype, (index, count))
        self.bias = _param((out_local,), 0, dtype, (index, count)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fuse_rows(*linears: ColumnParallelLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the layers' weights one after another, so a step
    runs one matmul where it ran several. Each layer's parameters become views into
    the fused tensors: loading or initialising them by name fills the fused ones, and
    the parameters keep their names and TP attributes."""
    weight = torch.cat([lin.weight.data for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ValueError("fused layers must all have a bias or none")
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start : start + rows]
        if bias is not None:
            lin.bias.data = bias[start : start + rows]  # type: ignore[union-attr]
        start += rows
    return weight, bias


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns; partial sums are all-reduced."""

    def __init__(
        self, in_features: int, out_features: int, group: ParallelGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        in_local = group.shard(in_features, "input features")
        self.weight = _param((out_features, in_local), 1, dtype, (group.rank, group.size))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of y, before the all-reduce."""
        return linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.partial(x))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; rows a rank lacks give zeros,
    and the all-reduce fills them in."""

    def __init__(
        self, vocab_size: int, hidden: int, group: ParallelGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        self.vocab_local = math.ceil(vocab_size / group.size)
        self.vocab_start = group.rank * self.vocab_local
        self.weight = _param((self.vocab_local, hidden), 0, dtype, (group.rank, group.size))

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows this rank holds, zeros elsewhere: before the all-reduce."""
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return x.masked_fill(outside[:, None], 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.partial(ids))


class ParallelLMHead(nn.Module):
    """Logits over the full vocabulary, gathered from every rank's slice."""

    def __init__(
        self, vocab_size: int, hidden: int, group: ParallelGroup, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        rows = math.ceil(vocab_size / group.size)
        self.weight = _param((rows, hidden), 0, dtype, (group.rank, group.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = linear(x, self.weight)  # [n, vocab_local]
        return self.group.all_gather(logits, dim=-1)[:, : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param((hidden,), None, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalised in float32 whatever the dtype, as Llama checkpoints expect.
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear or Llama 3 scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the half-split layout of Llama checkpoints."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling
    ) -> None:
        super().__init__()
        inv = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # [max_positions, head_dim // 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the step's positions, each [num_tokens, 1, head_dim // 2];
        looked up once per forward and shared by every layer."""
        return self.cos[positions][:, None, :], self.sin[positions][:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, heads, head_dim] -> rotated, same shape and dtype."""
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
