"""Hostile frames (serve.comm.frames) in process and over a real gloo process group.

Each case is a zstd frame declaring 1 GiB, a header claiming a 1 GiB tensor, a
truncated frame, a flipped payload or header byte, a wrong shape, dims that do
not match the raw size, and a wrong scale count (tests/fixtures/hostile_frames.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve.comm.frames import FrameError, decode_frame
from tests.fixtures.hostile_frames import (
    EXPECTED_DTYPE,
    EXPECTED_SHAPE,
    RECEIVER_CAP,
    hostile_frames,
    valid_frame,
)
from tests.integration.comm.group import CheckList, Checks, run_group

RSS_GROWTH_LIMIT = 64 << 20
# The bound of one framed message on the wire: the cap plus any header.
MAX_WIRE_BYTES = 1 << 20


def memory_kib() -> dict[str, int]:
    """Resident memory now (VmRSS) and at its peak (VmHWM), in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def decode(data: bytes) -> torch.Tensor:
    return decode_frame(data, RECEIVER_CAP, EXPECTED_SHAPE, EXPECTED_DTYPE)


def test_hostile_frames_in_process() -> None:
    """Pass: every hostile frame raises FrameError, a valid frame decoded right after
    each one equals its source bit for bit, and over all cases the process's peak
    and current resident memory grow by less than 64 MiB (a decoder that allocated
    what the 1 GiB cases declare would grow by 1 GiB)."""
    x, good = valid_frame()
    assert torch.equal(decode(good), x)  # warm-up: allocator and codec contexts
    before = memory_kib()
    for name, frame in hostile_frames().items():
        with pytest.raises(FrameError):
            decode(frame)
        assert torch.equal(decode(good), x), f"the frame after {name} was not decoded"
    after = memory_kib()
    assert (after["VmHWM"] - before["VmHWM"]) * 1024 < RSS_GROWTH_LIMIT
    assert (after["VmRSS"] - before["VmRSS"]) * 1024 < RSS_GROWTH_LIMIT


def hostile_frames_rank(rank: int, world: int) -> Checks:
    """Rank 0 sends each hostile frame and then a valid one through the TP
    collectives' bounded framed exchange (Transport.exchange_bytes: a length word
    and the payload land in a receive of the bound's size); rank 1 decodes them."""
    from serve.comm.collectives import Transport

    transport = Transport(rank, world)
    cases = hostile_frames()
    checks = CheckList()
    nothing = torch.zeros(0, dtype=torch.uint8)

    def swap(frame: bytes | None) -> bytes:
        send = torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else nothing
        got = transport.exchange_bytes(send, 1 - rank, max_length=MAX_WIRE_BYTES)
        return bytes(got.numpy())

    x, good = valid_frame()
    received = swap(good if rank == 0 else None)
    if rank == 1:
        with checks.check("warm-up frame decodes"):
            assert torch.equal(decode(received), x)
    before = memory_kib()
    for name, frame in cases.items():
        hostile = swap(frame if rank == 0 else None)
        follow = swap(good if rank == 0 else None)
        if rank == 0:
            continue
        with checks.check(f"{name} refused"):
            try:
                decode(hostile)
            except FrameError:
                pass
            else:
                raise AssertionError(f"{name} was decoded")
        with checks.check(f"{name}: next frame decodes"):
            assert torch.equal(decode(follow), x)
    after = memory_kib()
    if rank == 1:
        grew = {k: (after[k] - before[k]) * 1024 for k in after}
        with checks.check("resident memory growth"):
            assert max(grew.values()) < RSS_GROWTH_LIMIT, grew
        checks.results["growth_bytes"] = str(grew)
    return checks.results


def test_hostile_frames_between_two_gloo_ranks() -> None:
    """Pass: on the receiving rank of a real 2-rank gloo group, every hostile frame
    is refused with FrameError, the valid frame sent right after each one decodes
    bit for bit, and the rank's peak and current resident memory grow by less than
    64 MiB over all cases."""
    _, receiver = run_group(hostile_frames_rank, 2)
    assert len([k for k in receiver if k.endswith(" refused")]) == len(hostile_frames())
    for name, verdict in receiver.items():
        if name != "growth_bytes":
            assert verdict == "ok", f"{name}: {verdict} (growth {receiver.get('growth_bytes')})"
