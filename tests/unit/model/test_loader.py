"""Loading Hugging Face folders: tensors land where they belong, sharded
checkpoints and tied embeddings work, and broken folders fail with
InvalidArgument naming what is wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.dist.group import ParallelGroup
from serve.errors import InvalidArgument
from serve.model.config import ModelConfig
from serve.model.llama import LlamaForCausalLM
from serve.model.loader import load_model, load_weights
from tests.fixtures.hf_checkpoints import Checkpoint
from tests.fixtures.paged import PagedStepper

Tensors = dict[str, torch.Tensor]


def _copy_checkpoint(
    ckpt: Checkpoint,
    dst: Path,
    edit_tensors: Callable[[Tensors], None] | None = None,
    edit_config: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """A single-file copy of `ckpt` in `dst` with its tensors and/or config edited."""
    assert not ckpt.sharded
    shutil.copytree(ckpt.path, dst)
    if edit_tensors is not None:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _hf_state(ckpt: Checkpoint) -> Tensors:
    return {k: v.detach() for k, v in ckpt.hf_model().state_dict().items()}


def test_every_tensor_loaded_by_name(hf_checkpoint: Checkpoint) -> None:
    net = load_model(str(hf_checkpoint.path))
    hf = _hf_state(hf_checkpoint)
    ours = dict(net.named_parameters())
    assert set(ours) <= set(hf)
    for name, p in ours.items():
        assert torch.equal(p, hf[name]), name
    assert not net.training


def test_qwen2_ties_lm_head_to_embeddings(qwen2_checkpoint: Checkpoint) -> None:
    files = load_file(str(qwen2_checkpoint.path / "model.safetensors"))
    assert "lm_head.weight" not in files
    assert "model.layers.0.self_attn.q_proj.bias" in files
    net = load_model(str(qwen2_checkpoint.path))
    assert net.lm_head.weight is net.model.embed_tokens.weight
    assert net.model.layers[0].self_attn.q_proj.bias is not None
    assert net.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    assert net.model.layers[0].self_attn.o_proj.weight is not None


def test_sharded_checkpoint_loads_like_single_file(
    sharded_checkpoint: Checkpoint, llama_checkpoint: Checkpoint
) -> None:
    index = json.loads((sharded_checkpoint.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = load_model(str(sharded_checkpoint.path))
    single = load_model(str(llama_checkpoint.path))
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), single.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    tokens = list(range(5, 25))
    logits = PagedStepper(sharded).step(prefills=[(0, tokens)])
    with torch.no_grad():
        ref = sharded_checkpoint.hf_model()(torch.tensor([tokens])).logits[0]
    assert (logits - ref).abs().max() < 1e-5


def test_sharded_index_names_the_files_read(sharded_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """With an index, only the files it names are read: a stray file is ignored."""
    dst = tmp_path / "ckpt"
    shutil.copytree(sharded_checkpoint.path, dst)
    save_file({"model.norm.weight": torch.zeros(64)}, str(dst / "stray.safetensors"))
    net = load_model(str(dst))
    assert net.model.norm.weight.abs().sum() > 0


def test_missing_tensor(llama_checkpoint: Checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(
        llama_checkpoint,
        tmp_path / "ckpt",
        edit_tensors=lambda t: t.pop("model.layers.1.mlp.down_proj.weight"),
    )
    with pytest.raises(InvalidArgument, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(folder))


def test_missing_lm_head_when_not_tied(llama_checkpoint: Checkpoint, tmp_path: Path) -> None:
    folder = _copy_checkpoint(
        llama_checkpoint, tmp_path / "ckpt", edit_tensors=lambda t: t.pop("lm_head.weight")
    )
    with pytest.raises(InvalidArgument, match=r"lm_head\.weight"):
        load_model(str(folder))


@pytest.mark.parametrize(
    "shape",
    [(64, 65), (65, 64), (64, 63), (63, 64), (64,)],
    ids=["wider", "taller", "narrower", "shorter", "rank"],
)
def test_wrong_shape(llama_checkpoint: Checkpoint, tmp_path: Path, shape: tuple[int, ...]) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(t: Tensors) -> None:
        assert t[name].shape == (64, 64)
        t[name] = torch.ones(shape)

    folder = _copy_checkpoint(llama_checkpoint, tmp_path / "ckpt", edit_tensors=edit)
    with pytest.raises(InvalidArgument, match=r"q_proj\.weight"):
        load_model(str(folder))


def test_vocab_mismatch_between_config_and_weights(
    llama_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["vocab_size"] += 8

    folder = _copy_checkpoint(llama_checkpoint, tmp_path / "ckpt", edit_config=edit)
    with pytest.raises(InvalidArgument, match="embed_tokens|lm_head"):
        load_model(str(folder))


def test_unsupported_model_type(llama_checkpoint: Checkpoint, tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["model_type"] = "gpt2"

    folder = _copy_checkpoint(llama_checkpoint, tmp_path / "ckpt", edit_config=edit)
    with pytest.raises(InvalidArgument, match="gpt2"):
        load_model(str(folder))


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type(llama3_checkpoint: Checkpoint, tmp_path: Path, key: str) -> None:
    def edit(c: dict[str, Any]) -> None:
        params = c.pop("rope_parameters")
        c[key] = {**params, "rope_type": "yarn", "factor": 4.0}

    folder = _copy_checkpoint(llama3_checkpoint, tmp_path / "ckpt", edit_config=edit)
    with pytest.raises(InvalidArgument, match="yarn"):
        load_model(str(folder))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="config.json"):
        load_model(str(tmp_path))


def test_folder_without_weights(llama_checkpoint: Checkpoint, tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    shutil.copytree(llama_checkpoint.path, dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(InvalidArgument, match="safetensors"):
        load_model(str(dst))


def test_unknown_dtype(llama_checkpoint: Checkpoint) -> None:
    with pytest.raises(InvalidArgument, match="float8"):
        load_model(str(llama_checkpoint.path), dtype="float8")


def _rank_model(ckpt_path: Path, rank: int, size: int) -> LlamaForCausalLM:
    """One TP rank's model; no collective runs while loading."""
    group = ParallelGroup(rank=rank, size=size)
    model = LlamaForCausalLM(ModelConfig.from_folder(ckpt_path), group)
    load_weights(model, ckpt_path, group)
    return model


def test_tensor_parallel_ranks_read_their_slices(llama_checkpoint: Checkpoint) -> None:
    full = dict(load_model(str(llama_checkpoint.path)).named_parameters())
    ranks = [dict(_rank_model(llama_checkpoint.path, r, 2).named_parameters()) for r in range(2)]
    for name, p in full.items():
        tp_dim = p.tp_dim  # type: ignore[attr-defined]
        if tp_dim is None:
            assert all(torch.equal(r[name], p) for r in ranks), name
        else:
            assert ranks[0][name].shape[tp_dim] * 2 == p.shape[tp_dim], name
            assert torch.equal(torch.cat([r[name] for r in ranks], dim=tp_dim), p), name


def test_last_vocab_shard_is_zero_padded(llama_checkpoint: Checkpoint, tmp_path: Path) -> None:
    """A vocabulary that does not divide by the TP size: the last rank's rows
    past the vocabulary are zeros."""

    def cut(t: Tensors) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[name] = t[name][:399].contiguous()

    def vocab(c: dict[str, Any]) -> None:
        c["vocab_size"] = 399

    folder = _copy_checkpoint(llama_checkpoint, tmp_path / "ckpt", cut, vocab)
    full = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    r0, r1 = (_rank_model(folder, r, 2) for r in range(2))
    assert r0.lm_head.weight.shape == r1.lm_head.weight.shape == (200, 64)
    assert torch.equal(r0.lm_head.weight, full[:200])
    assert torch.equal(r1.lm_head.weight[:199], full[200:])
    assert torch.equal(r1.lm_head.weight[199], torch.zeros(64))
    assert torch.equal(r1.model.embed_tokens.weight[199], torch.zeros(64))
