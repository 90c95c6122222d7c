"""Collectives on real gloo process groups of 2, 3 and 4 spawned ranks.

Each group runs every check once (tests/integration/comm/workers.py); the tests
below read the verdicts, so one spawn serves many assertions."""

from __future__ import annotations

import functools

import pytest

from tests.integration.comm.group import Checks, run_group
from tests.integration.comm.workers import LOSSY, collective_checks


@functools.cache
def _verdicts(world: int) -> tuple[Checks, ...]:
    return tuple(run_group(collective_checks, world))


def _assert_ok(world: int, prefix: str) -> None:
    matched = 0
    for rank, checks in enumerate(_verdicts(world)):
        for name, verdict in checks.items():
            if name.startswith(prefix):
                matched += 1
                assert verdict == "ok", f"rank {rank} of {world}: {name}: {verdict}"
    assert matched, f"no check named {prefix!r} ran"


WORLDS = [2, 3, 4]


@pytest.mark.parametrize("world", WORLDS)
def test_none_is_bit_exact_and_identical_on_every_rank(world: int) -> None:
    _assert_ok(world, "none:")


@pytest.mark.parametrize("world", WORLDS)
def test_lossless_is_bit_exact(world: int) -> None:
    _assert_ok(world, "lossless:")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codec_within_bounds_and_identical(world: int, codec: str) -> None:
    _assert_ok(world, f"{codec}:")


@pytest.mark.parametrize("world", WORLDS)
def test_auto_choices(world: int) -> None:
    _assert_ok(world, "auto:")


@pytest.mark.parametrize("world", WORLDS)
def test_counters(world: int) -> None:
    _assert_ok(world, "counters:")


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_and_broadcast(world: int) -> None:
    _assert_ok(world, "all_gather")
    _assert_ok(world, "broadcast")


def test_pipelined_exchange_matches_the_unsplit_one() -> None:
    _assert_ok(2, "pipelined")
