"""Tensor parallelism across real processes (gloo): a replica of N rank
processes must give the greedy tokens of one process and of transformers."""

from __future__ import annotations

import asyncio

import pytest

from serve.config import EngineConfig, TPConfig
from serve.launch import Deployment, LaunchConfig
from tests.fixtures.hf_checkpoints import CheckpointFactory
from tests.integration.test_parity_grpc import _generate, _greedy_reference, _prompt

NUM_TOKENS = 64


def _serve_and_generate(model: str, tp: int, prompts: list[list[int]], codec: str = "none"):
    async def scenario() -> list[list[int]]:
        cfg = LaunchConfig(
            model=model,
            port=0,
            engine=EngineConfig(block_size=4, num_kv_blocks=256),
            num_threads=1,
            tp=TPConfig(size=tp, comm_codec=codec, timeout_s=20),
            log_level="warning",
        )
        dep = Deployment(cfg)
        gateway = await dep.start()
        try:
            target = f"127.0.0.1:{gateway.port}"
            streams = await asyncio.gather(
                *(
                    _generate(target, p, max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
                    for p in prompts
                )
            )
            return [s.token_ids for s in streams]
        finally:
            await dep.stop()

    return asyncio.run(scenario())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_matches_tp1_and_transformers(arch: str, checkpoint_factory: CheckpointFactory) -> None:
    ckpt = checkpoint_factory(arch)
    prompts = [_prompt(ckpt, n, seed=7 + n) for n in (5, 23)]
    reference = [_greedy_reference(ckpt, p, max_tokens=NUM_TOKENS) for p in prompts]
    tp1 = _serve_and_generate(str(ckpt.path), 1, prompts)
    tp2 = _serve_and_generate(str(ckpt.path), 2, prompts)
    assert tp1 == reference
    assert tp2 == reference


def test_tp4_replicates_kv_heads_when_fewer_than_ranks(
    checkpoint_factory: CheckpointFactory,
) -> None:
    ckpt = checkpoint_factory("llama")
    assert ckpt.config()["num_key_value_heads"] == 2  # < 4 ranks: each KV head on two ranks
    prompt = _prompt(ckpt, 11, seed=3)
    reference = _greedy_reference(ckpt, prompt, max_tokens=NUM_TOKENS)
    assert _serve_and_generate(str(ckpt.path), 4, [prompt]) == [reference]


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shardwire_comm_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_int8_activations_cross_the_wire_compressed_and_show_on_metrics() -> None:
    async def scenario() -> dict[str, float]:
        cfg = LaunchConfig(
            model="tiny",
            port=0,
            engine=EngineConfig(kv_cache_bytes=16 << 20),
            num_threads=1,
            tp=TPConfig(size=2, comm_codec="int8", timeout_s=20),
            log_level="warning",
        )
        dep = Deployment(cfg)
        gateway = await dep.start()
        try:
            # 300 tokens x hidden 128 x fp32 = 150 KB per all-reduce: the coded path.
            prompt = [(7 * i) % 250 for i in range(300)]
            stream = await _generate(f"127.0.0.1:{gateway.port}", prompt, max_tokens=4)
            assert len(stream.token_ids) == 4
            return await asyncio.to_thread(_scrape, dep.replica_metrics_ports[0])
        finally:
            await dep.stop()

    values = asyncio.run(scenario())
    raw = values['shardwire_comm_raw_bytes_total{codec="int8"}']
    wire = values['shardwire_comm_wire_bytes_total{codec="int8"}']
    assert raw > 0
    # float32 activations: one byte per value plus a 2-byte scale per 64 -> ~0.26.
    assert 0.2 * raw < wire < 0.3 * raw
