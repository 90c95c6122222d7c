"""Pure parts of the collectives: configuration, sum order, two-shot chunks,
counters. (Collectives on real process groups: tests/integration/comm.)"""

from __future__ import annotations

import pytest
import torch

from serve.comm.collectives import (
    MAX_PIPELINE_CHUNKS,
    CommConfig,
    CommStats,
    Communicator,
    block_split,
    pipeline_split,
    tree_sum,
)


def test_config_refuses_unknown_policies_and_negative_thresholds() -> None:
    with pytest.raises(ValueError):
        CommConfig(accuracy="approximately")
    with pytest.raises(ValueError):
        CommConfig(small_message_bytes=-1)


def test_auto_needs_a_link_model_beyond_one_rank() -> None:
    with pytest.raises(ValueError, match="LinkModel"):
        Communicator(0, 2, CommConfig(codec="auto"))
    with pytest.raises(ValueError):
        Communicator(2, 2, CommConfig())


def test_a_group_of_one_is_the_identity() -> None:
    comm = Communicator(0, 1, CommConfig(codec="int8"))
    x = torch.randn(4, 8)
    assert comm.all_reduce(x) is x
    assert comm.all_gather(x) is x
    assert comm.broadcast_tensor(x) is x


def test_tree_sum_adds_pairwise_in_rank_order() -> None:
    # Float addition is not associative: the tree fixes one order.
    parts = [torch.tensor([v], dtype=torch.float32) for v in (1e8, 1.0, -1e8, 1.0)]
    a, b, c, d = parts
    assert torch.equal(tree_sum(parts), (a + b) + (c + d))
    assert torch.equal(tree_sum(parts[:3]), (a + b) + c)
    assert torch.equal(tree_sum(parts[:1]), a)


def test_split_chunks_are_whole_blocks_and_never_empty() -> None:
    assert block_split(40000, 3, 64) == [13376, 13376, 13248]
    assert block_split(1000, 4, 32) == [256, 256, 256, 232]
    assert block_split(576, 4, 64) is None  # 9 blocks: one rank would get none
    for n in range(1, 3000, 37):
        sizes = block_split(n, 4, 64)
        if sizes is not None:
            assert sum(sizes) == n and min(sizes) > 0
            assert all(s % 64 == 0 for s in sizes[:-1])


def test_stats_count_per_codec() -> None:
    stats = CommStats()
    stats.record("int8", 100, 52, 0.5)
    stats.record("int8", 100, 52, 0.25)
    stats.record("none", 10, 10, 0.1)
    snap = stats.snapshot()
    assert snap["int8"] == {"messages": 2, "raw_bytes": 200, "wire_bytes": 104, "seconds": 0.75}
    assert list(snap) == ["int8", "none"]
    stats.reset()
    assert stats.snapshot() == {}


def test_pipeline_chunks_aim_at_the_chunk_size_and_cap_their_number() -> None:
    assert pipeline_split(1000, 2, 64, 0) is None  # off
    assert pipeline_split(100_000, 2, 64, 256 * 1024) is None  # under two chunks
    sizes = pipeline_split(1 << 20, 2, 64, 256 * 1024)  # 2 MiB of bf16: 8 chunks
    assert sizes is not None and len(sizes) == 8 and sum(sizes) == 1 << 20
    sizes = pipeline_split(1 << 30, 2, 64, 256 * 1024)
    assert sizes is not None and len(sizes) == MAX_PIPELINE_CHUNKS
