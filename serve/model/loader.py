"""Builds a model from a preset or a local Hugging Face folder.

Each rank reads only its slice of every tensor from the safetensors files
(`safe_open(...).get_slice`), so a TP rank never holds the whole checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from serve.dist.group import ParallelGroup
from serve.errors import InvalidArgument
from serve.model.config import ModelConfig
from serve.model.llama import LlamaForCausalLM
from serve.model.presets import PRESETS

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidArgument(f"dtype {name!r} is not supported (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def load_config(model: str) -> ModelConfig:
    """The architecture of a preset name or a Hugging Face folder."""
    if model in PRESETS:
        return PRESETS[model]
    return ModelConfig.from_folder(model)


def load_model(
    model: str,
    group: ParallelGroup | None = None,
    dtype: str = "float32",
    max_positions: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A ready-to-run model (eval mode) for this rank."""
    group = group or ParallelGroup.single()
    cfg = load_config(model)
    net = LlamaForCausalLM(cfg, group, max_positions, parse_dtype(dtype))
    if model in PRESETS:
        net.init_random(seed)
        _shape_preset_head(net)
        logger.info("built preset %s (%.1fM params, seed %d)", model, cfg.num_params / 1e6, seed)
    else:
        load_weights(net, Path(model), group)
        logger.info("loaded %s (%.1fM params)", model, cfg.num_params / 1e6)
    return net.eval()


def _shape_preset_head(net: LlamaForCausalLM) -> None:
    """Makes the presets' random text readable: LM-head rows of byte tokens
    that are not printable ASCII (or newline), and special tokens other than
    end-of-sequence, are zeroed, the others scaled so
    logits spread with a standard deviation near 4. A zero row's logit is 0
    while the best printable one is far above it, so such bytes are (almost)
    never drawn."""
    head = net.lm_head.weight  # [vocab_local, hidden]
    start = net.group.rank * head.shape[0]
    keep = set(range(0x20, 0x7F)) | {0x0A} | set(net.config.eos_token_ids)
    scale = 4.0 / (0.02 * net.config.hidden_size**0.5)  # init_random draws std 0.02
    for row in range(head.shape[0]):
        if start + row in keep:
            head.data[row] *= scale
        else:
            head.data[row].zero_()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidArgument(f"no *.safetensors files in {folder}")
    return files


def load_weights(net: LlamaForCausalLM, folder: Path, group: ParallelGroup) -> None:
    """Copies this rank's slice of every checkpoint tensor into net."""
    params = dict(net.named_parameters())
    loaded: set[str] = set()
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name not in params:
                    continue
                p = params[name]
                tp_dim = p.tp_dim  # type: ignore[attr-defined]
                sl = f.get_slice(name)
                expected = _full_shape(net, name, p, group)
                if list(sl.get_shape()) != expected:
                    raise InvalidArgument(
                        f"tensor {name} in {path.name} has shape {tuple(sl.get_shape())}, "
                        f"expected {tuple(expected)}"
                    )
                if tp_dim is None:
                    t = sl[:]
                else:
                    full = sl.get_shape()[tp_dim]
                    start = p.tp_index * p.shape[tp_dim]  # type: ignore[attr-defined]
                    stop = min(start + p.shape[tp_dim], full)
                    index = [slice(None)] * len(p.shape)
                    index[tp_dim] = slice(start, stop)
                    t = sl[tuple(index)]
                _copy(p, t, name)
                loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise InvalidArgument(
            f"checkpoint in {folder} lacks tensors: {', '.join(sorted(missing)[:5])}"
        )


_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _full_shape(
    net: LlamaForCausalLM, name: str, p: torch.nn.Parameter, group: ParallelGroup
) -> list[int]:
    """The shape the whole checkpoint tensor must have for this rank's slice p
    (the vocabulary tensors: the config's vocab_size rows, not a multiple of
    the TP size)."""
    shape = list(p.shape)
    tp_dim = p.tp_dim  # type: ignore[attr-defined]
    if tp_dim is not None:
        count = p.tp_count  # type: ignore[attr-defined]
        full = net.config.vocab_size if name in _VOCAB_TENSORS else shape[tp_dim] * count
        shape[tp_dim] = full
    return shape


def _copy(p: torch.nn.Parameter, t: torch.Tensor, name: str) -> None:
    if t.shape == p.shape:
        p.data.copy_(t)
        return
    # The last vocab shard may be shorter than the others: pad with zeros.
    if t.dim() == p.dim() and all(a <= b for a, b in zip(t.shape, p.shape, strict=True)):
        p.data.zero_()
        p.data[tuple(slice(0, s) for s in t.shape)].copy_(t)
        return
    raise InvalidArgument(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
