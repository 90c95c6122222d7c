"""KV moves between replicas of different TP sizes: a TP=2 replica (two gloo rank
processes, each holding half the KV heads) and a TP=1 replica behind one gateway.
A request moved at output token 40 in either direction, with an exact KV codec,
gives exactly the tokens of an unmoved run; the TP leader gathers the other
rank's heads for the wire, and scatters the heads it receives."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
from shardwire.v1 import shard_pb2

from serve.config import CLUSTER_SECRET_ENV, EngineConfig, ShardConfig, TPConfig
from serve.launch import free_port, shard_argv, wait_serving
from serve.shard.app import start_shard
from tests.fixtures import tp_tap_leader
from tests.fixtures.servers import Servers, idle_free_blocks, servers, shard_status
from tests.fixtures.streams import Stream
from tests.integration.gateway.test_migration import MAX_TOKENS, MIGRATE_AT, _migrated_run, _run

SECRET = secrets.token_urlsafe(16)


def _spawn_tp2(port: int, role: str = "both") -> list[subprocess.Popen]:
    master_port = free_port()
    env = {**os.environ, CLUSTER_SECRET_ENV: SECRET}
    procs = []
    for rank in range(2):
        cfg = ShardConfig(
            port=port,
            engine=EngineConfig(kv_cache_bytes=16 * 1024 * 1024),
            num_threads=1,
            tp=TPConfig(size=2, rank=rank, master_port=master_port, timeout_s=20),
            metrics_port=-1,
            role=role,
        )
        procs.append(subprocess.Popen(shard_argv(cfg, "warning", "text"), env=env))
    return procs


@contextlib.contextmanager
def tp2_replica(role: str = "both") -> Iterator[str]:
    """A TP=2 replica (two rank processes); yields its leader's address."""
    port = free_port()
    procs = _spawn_tp2(port, role)
    try:
        address = f"127.0.0.1:{port}"
        asyncio.run(wait_serving(address, 120, procs[0]))
        yield address
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def mixed() -> Iterator[tuple[Servers, str, str, str]]:
    """(servers, TP=2 leader address, TP=1 address, gateway address)."""
    with tp2_replica() as tp2:
        for s in servers():
            tp1 = s.shard(cluster_secret=SECRET)
            yield s, tp2, tp1, s.gateway([tp2, tp1], cluster_secret=SECRET)


@pytest.mark.parametrize("codec", ["none", "lossless"])
def test_moves_between_tp2_and_tp1_keep_the_tokens(mixed, codec: str) -> None:
    s, tp2, tp1, target = mixed
    prompt = [(7 * j + 1) % 250 for j in range(29)]
    directions: set[tuple[str, str]] = set()
    for blocked in (False, True):
        # A long stream on the replica an idle gateway picks first sends the next
        # requests to the other one (least outstanding tokens): both directions run.
        blocker = Stream(target, [5, 6, 7], max_tokens=1500).start() if blocked else None
        if blocker is not None:
            assert blocker.started.wait(30)
        reference = _run(target, prompt=prompt)
        tokens, moved = _migrated_run(target, codec, prompt=prompt)
        assert moved.num_output_tokens == MIGRATE_AT
        assert len(tokens) == MAX_TOKENS
        assert tokens == reference, f"{moved.source} -> {moved.target}"
        directions.add((moved.source, moved.target))
        if blocker is not None:
            assert blocker.join().code == "OK"
    assert directions == {(tp2, tp1), (tp1, tp2)}
    # Every block back on both replicas.
    assert idle_free_blocks(tp1, cluster_secret=SECRET) == s.shards[0].engine.engine.kv.num_blocks
    total = shard_status(tp2, SECRET).kv_blocks_total
    assert idle_free_blocks(tp2, cluster_secret=SECRET) == total


def test_tp2_taps_hand_over_each_layer_while_the_step_runs() -> None:
    """A TP leader's tap gets every KV head of a layer as soon as that layer is
    done on both ranks, before the next layer runs, and exactly the KV both ranks
    hold (tests/fixtures/tp_tap_leader.py)."""
    master_port = free_port()
    cfg = tp_tap_leader.leader_config(master_port)
    rank1 = dataclasses.replace(cfg, tp=dataclasses.replace(cfg.tp, rank=1))
    worker = subprocess.Popen(shard_argv(rank1, "warning", "text"))
    try:
        leader = subprocess.run(
            [sys.executable, "-m", "tests.fixtures.tp_tap_leader", str(master_port)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        assert worker.wait(30) == 0
    finally:
        worker.kill()
    report = json.loads(leader.stdout.strip().splitlines()[-1])
    num_layers = 4
    steps = [[0, 16], [16, 32], [32, 45]]  # chunked prefill, 16 tokens a step
    expected: list[list] = []
    for start, _ in steps:
        for layer in range(num_layers):
            expected += [["layer", layer], ["sink", layer, start]]
    assert report["events"] == expected
    assert report["exact"] == [True] * len(expected[1::2])
    heads = report["num_kv_heads"]
    assert [shape[1:] for shape in report["heads"]] == [[heads, 32]] * (num_layers * len(steps))
    assert [shape[0] for shape in report["heads"]] == [b - a for a, b in steps for _ in range(4)]


def test_tp2_prefill_hands_over_to_a_tp1_decode_replica() -> None:
    """Disaggregated prefill from a TP leader: each layer's KV, gathered from both
    ranks as the layer finishes, streams to the decode replica."""
    with tp2_replica("prefill") as prefill:
        for s in servers():
            colocated = s.gateway([s.shard(cluster_secret=SECRET)], cluster_secret=SECRET)
            engine = EngineConfig(kv_cache_bytes=16 * 1024 * 1024)
            config = ShardConfig(port=0, engine=engine, role="decode", cluster_secret=SECRET)
            decode = s.run(start_shard(config), 120)
            s.shards.append(decode)
            disaggregated = s.gateway(
                [prefill, f"127.0.0.1:{decode.port}"], kv_codec="lossless", cluster_secret=SECRET
            )
            for n in (1, 23, 70):
                prompt = [(5 * j + 2) % 250 for j in range(n)]
                reference = _run(colocated, prompt=prompt, max_tokens=40)
                assert _run(disaggregated, prompt=prompt, max_tokens=40) == reference
            assert decode.engine.engine.num_steps > 0, "the decode replica never ran"
            total = shard_status(prefill, SECRET).kv_blocks_total
            assert idle_free_blocks(prefill, cluster_secret=SECRET) == total
