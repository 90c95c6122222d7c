"""Built-in models with random weights from a fixed seed (no download needed).

They share the built-in byte-level tokenizer (serve.model.tokenizer), whose
vocabulary has 264 entries; its end-of-sequence ids are 258 and 262.
"""

from __future__ import annotations

from serve.model.config import ModelConfig

BUILTIN_VOCAB_SIZE = 264
BUILTIN_BOS_ID = 257
BUILTIN_EOS_IDS = (258, 262)

PRESETS: dict[str, ModelConfig] = {
    # Starts in about a second; the default model.
    "tiny": ModelConfig(
        architecture="llama",
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        bos_token_id=BUILTIN_BOS_ID,
        eos_token_ids=BUILTIN_EOS_IDS,
    ),
    # About 100M parameters, for benchmarks.
    "small": ModelConfig(
        architecture="llama",
        vocab_size=BUILTIN_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        bos_token_id=BUILTIN_BOS_ID,
        eos_token_ids=BUILTIN_EOS_IDS,
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS
