"""A peer that announces a huge message length is refused before a receive
buffer of that size exists (three real gloo ranks)."""

from __future__ import annotations

from tests.integration.comm.group import run_group
from tests.integration.comm.length_workers import announced_lengths


def test_huge_announced_length_is_refused_before_allocation() -> None:
    """Pass: ranks 0 and 1 get a ValueError naming the announced 2**40 bytes from
    all_to_all_bytes (bound 4096), their peak RSS grows by under 64 MiB, and the
    two of them still swap tensors afterwards."""
    verdicts = run_group(announced_lengths, 3, timeout_s=60)
    for rank in (0, 1):
        assert verdicts[rank] == {
            "refused": "ok",
            "nothing_allocated": "ok",
            "still_talking": "ok",
        }, (rank, verdicts[rank])
