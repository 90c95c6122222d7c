"""Fixtures shared by every test directory."""

from tests.fixtures.hf_checkpoints import (  # noqa: F401 - fixtures are found by name
    checkpoint_factory,
    hf_checkpoint,
    llama3_checkpoint,
    llama_checkpoint,
    mistral_checkpoint,
    qwen2_checkpoint,
    sharded_checkpoint,
)
