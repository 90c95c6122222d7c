"""Fused projections alias their named parameters; the single-row bfloat16 matmul
agrees with F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve.dist.group import ParallelGroup
from serve.model.layers import ColumnParallelLinear, fuse_rows, linear
from serve.model.loader import load_model


def _column(rows: int, bias: bool) -> ColumnParallelLinear:
    return ColumnParallelLinear(8, rows, bias, ParallelGroup.single(), torch.float32)


def test_fused_rows_alias_the_named_parameters() -> None:
    a, b = _column(4, True), _column(6, True)
    weight, bias = fuse_rows(a, b)
    assert weight.shape == (10, 8) and bias is not None and bias.shape == (10,)
    # Writing a parameter by name (as the loader does) fills the fused tensor ...
    a.weight.data.copy_(torch.full((4, 8), 1.0))
    b.weight.data.copy_(torch.full((6, 8), 2.0))
    a.bias.data.zero_()  # type: ignore[union-attr]
    b.bias.data.copy_(torch.arange(6.0))  # type: ignore[union-attr]
    assert torch.equal(weight[:4], torch.ones(4, 8))
    assert torch.equal(weight[4:], torch.full((6, 8), 2.0))
    assert torch.equal(bias[4:], torch.arange(6.0))
    # ... and one matmul gives what the separate layers give.
    x = torch.randn(3, 8)
    fused = F.linear(x, weight, bias)
    torch.testing.assert_close(fused, torch.cat([a(x), b(x)], dim=-1), atol=1e-6, rtol=1e-6)
    # The parameters keep their TP attributes.
    assert a.weight.tp_dim == 0  # type: ignore[attr-defined]


def test_fusing_needs_all_or_no_biases() -> None:
    with pytest.raises(ValueError, match="bias"):
        fuse_rows(_column(4, True), _column(4, False))


def test_model_state_dict_reads_through_the_fused_weights() -> None:
    net = load_model("tiny")
    attn = net.model.layers[0].self_attn
    q_rows = attn.q_proj.weight.shape[0]
    assert attn.qkv_weight.data_ptr() == attn.q_proj.weight.data_ptr()
    state = net.state_dict()
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], attn.qkv_weight[:q_rows])
    mlp = net.model.layers[0].mlp
    assert torch.equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.gate_up_weight)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_linear_matches_f_linear_in_bfloat16(rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    b = torch.randn(64, generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 32, generator=gen).to(torch.bfloat16)
    ours = linear(x, w, b).float()
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert ours.shape == (rows, 64)
    # bfloat16 keeps 8 bits of mantissa: within a few units of the last place.
    torch.testing.assert_close(ours, ref, atol=0.1, rtol=2e-2)


def test_linear_is_f_linear_in_float32() -> None:
    w, x = torch.randn(16, 8), torch.randn(1, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))
