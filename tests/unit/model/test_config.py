"""ModelConfig parsing of Hugging Face config.json (both rope forms), the
parameter count, and the built-in presets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from serve.dist.group import ParallelGroup
from serve.errors import InvalidArgument
from serve.model.config import ModelConfig, RopeScaling
from serve.model.layers import rope_inv_freq
from serve.model.llama import LlamaForCausalLM
from serve.model.loader import load_config, load_model
from serve.model.presets import PRESETS
from tests.fixtures.hf_checkpoints import Checkpoint

LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama(**extra: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        **extra,
    }


def test_old_form_rope_theta_and_rope_scaling() -> None:
    """transformers 4.x: rope_theta at the top level, rope_scaling beside it."""
    cfg = ModelConfig.from_hf(
        _llama(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING})
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_new_form_rope_parameters() -> None:
    """transformers 5: rope_theta and the scaling fields inside rope_parameters."""
    cfg = ModelConfig.from_hf(
        _llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING})
    )
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_both_forms_give_the_same_config() -> None:
    old = ModelConfig.from_hf(_llama(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2}))
    new = ModelConfig.from_hf(
        _llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    )
    assert old == new
    assert new.rope_scaling.rope_type == "linear"
    assert new.rope_scaling.factor == 2.0


@pytest.mark.parametrize(
    "extra",
    [{}, {"rope_scaling": None}, {"rope_parameters": {"rope_type": "default"}}],
    ids=["absent", "null", "default"],
)
def test_no_scaling(extra: dict[str, Any]) -> None:
    cfg = ModelConfig.from_hf(_llama(**extra))
    assert cfg.rope_scaling == RopeScaling()
    assert cfg.rope_theta == 10000.0


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(rope_type: str, key: str) -> None:
    with pytest.raises(InvalidArgument, match=rope_type):
        ModelConfig.from_hf(_llama(**{key: {"rope_type": rope_type, "factor": 4.0}}))


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral", ""])
def test_unsupported_model_type(model_type: str) -> None:
    with pytest.raises(InvalidArgument, match="model_type"):
        ModelConfig.from_hf(_llama(model_type=model_type))


def test_unsupported_activation() -> None:
    with pytest.raises(InvalidArgument, match="gelu"):
        ModelConfig.from_hf(_llama(hidden_act="gelu"))


def test_heads_must_group_evenly() -> None:
    with pytest.raises(InvalidArgument, match="num_kv_heads"):
        ModelConfig.from_hf(_llama(num_key_value_heads=3))


def test_defaults_and_explicit_fields() -> None:
    cfg = ModelConfig.from_hf(_llama(num_key_value_heads=None, eos_token_id=[5, 7], bos_token_id=1))
    assert cfg.num_kv_heads == cfg.num_heads == 4
    assert cfg.head_dim == 16
    assert cfg.eos_token_ids == (5, 7)
    assert cfg.bos_token_id == 1
    assert ModelConfig.from_hf(_llama(head_dim=32)).head_dim == 32
    assert ModelConfig.from_hf(_llama(eos_token_id=2)).eos_token_ids == (2,)
    assert ModelConfig.from_hf(_llama()).eos_token_ids == ()


def test_qwen2_bias_and_sliding_window() -> None:
    base = _llama(model_type="qwen2", sliding_window=4096, tie_word_embeddings=True)
    cfg = ModelConfig.from_hf(base)
    assert cfg.attention_bias
    assert cfg.tie_word_embeddings
    # Qwen2 ignores sliding_window unless use_sliding_window is set.
    assert cfg.sliding_window is None
    assert ModelConfig.from_hf({**base, "use_sliding_window": True}).sliding_window == 4096
    assert not ModelConfig.from_hf(_llama()).attention_bias
    assert ModelConfig.from_hf(_llama(model_type="mistral", sliding_window=64)).sliding_window == 64


def test_saved_checkpoint_configs(hf_checkpoint: Checkpoint) -> None:
    """config.json as transformers writes it today parses to the right fields."""
    raw = hf_checkpoint.config()
    cfg = ModelConfig.from_folder(hf_checkpoint.path)
    assert cfg.architecture == hf_checkpoint.model_type
    assert cfg.vocab_size == hf_checkpoint.vocab_size == len(hf_checkpoint.tokenizer())
    assert cfg.eos_token_ids == (hf_checkpoint.eos_token_id,)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    expected_theta = {"llama": 1e4, "llama3": 5e5, "mistral": 1e4, "qwen2": 1e6}
    assert cfg.rope_theta == expected_theta[hf_checkpoint.arch]
    assert cfg.rms_norm_eps == raw["rms_norm_eps"]
    if hf_checkpoint.arch == "llama3":
        assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    else:
        assert cfg.rope_scaling.rope_type == "default"
    assert cfg.tie_word_embeddings == (hf_checkpoint.arch == "qwen2")
    assert cfg.attention_bias == (hf_checkpoint.arch == "qwen2")
    assert cfg.sliding_window == (4096 if hf_checkpoint.arch == "mistral" else None)


def test_num_params_matches_the_modules(hf_checkpoint: Checkpoint) -> None:
    cfg = ModelConfig.from_folder(hf_checkpoint.path)
    net = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in net.parameters()) == cfg.num_params
    assert hf_checkpoint.hf_model().num_parameters() == cfg.num_params


def test_llama3_rope_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", **LLAMA3_SCALING, "original_max_position_embeddings": 32}
    hf = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig.from_hf(hf.to_dict())
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0)
    plain = rope_inv_freq(cfg.head_dim, cfg.rope_theta, RopeScaling())
    assert not torch.allclose(ours, plain)


def test_from_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="config.json"):
        ModelConfig.from_folder(tmp_path)


def test_presets_build_deterministically() -> None:
    a = load_model("tiny", seed=0).state_dict()
    b = load_model("tiny", seed=0).state_dict()
    c = load_model("tiny", seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(
        a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"]
    )


def test_tiny_preset_is_runnable() -> None:
    cfg = load_config("tiny")
    net = load_model("tiny")
    assert sum(p.numel() for p in net.parameters()) == cfg.num_params
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_small_preset_has_about_100m_params() -> None:
    cfg = PRESETS["small"]
    assert 90e6 <= cfg.num_params <= 110e6
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert cfg.hidden_size == cfg.num_heads * cfg.head_dim


def test_preset_weights_do_not_depend_on_tp_size() -> None:
    """Each TP rank draws the full tensor from the same seed and keeps its slice."""
    cfg = PRESETS["tiny"]
    single = LlamaForCausalLM(cfg)
    single.init_random(3)
    full = dict(single.named_parameters())
    ranks = []
    for rank in range(2):
        net = LlamaForCausalLM(cfg, ParallelGroup(rank=rank, size=2))
        net.init_random(3)
        ranks.append(dict(net.named_parameters()))
    for name, p in full.items():
        tp_dim = p.tp_dim  # type: ignore[attr-defined]
        parts = [r[name] for r in ranks]
        joined = parts[0] if tp_dim is None else torch.cat(parts, dim=tp_dim)
        assert torch.equal(joined[: p.shape[0]], p), name
