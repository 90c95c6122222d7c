"""Ranks of a three-rank group where rank 2 announces lengths it should not
(importable by spawned ranks)."""

from __future__ import annotations

import resource

import torch

from serve.comm.collectives import Transport
from tests.integration.comm.group import CheckList, Checks

HUGE = 1 << 40  # a terabyte: allocating it would fail or take the host down
BOUND = 4096


def announced_lengths(rank: int, world: int) -> Checks:
    cl = CheckList()
    t = Transport(rank, world)
    peers = [r for r in range(world) if r != rank]
    if rank == 2:
        # The lengths round of all_to_all_bytes, with a hostile length to each peer.
        theirs = {r: torch.empty(1, dtype=torch.int64) for r in peers}
        t._p2p(
            [(torch.tensor([HUGE], dtype=torch.int64), r) for r in peers],
            [(theirs[r], r) for r in peers],
        )
        return cl.results
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bufs: list[torch.Tensor | None] = [
        None if r == rank else torch.zeros(100, dtype=torch.uint8) for r in range(world)
    ]
    with cl.check("refused"):
        try:
            t.all_to_all_bytes(bufs, None, max_length=BOUND)
        except ValueError as exc:
            assert "announced" in str(exc) and str(HUGE) in str(exc), str(exc)
        else:
            raise AssertionError("a terabyte-long message was accepted")
    with cl.check("nothing_allocated"):
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
        assert grown_kib < 64 * 1024, f"peak RSS grew {grown_kib} KiB"
    # The two honest ranks still talk (their payload round was never posted).
    x = torch.full((4,), float(rank))
    y = torch.empty(4)
    t.exchange(x, y, 1 - rank)
    with cl.check("still_talking"):
        assert torch.equal(y, torch.full((4,), float(1 - rank)))
    return cl.results
