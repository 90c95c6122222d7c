"""Direct exchanges (shared memory, TCP) between two real gloo ranks."""

from __future__ import annotations

import pytest

from serve.comm.shm import shm_supported
from serve.config import TPConfig
from tests.integration.comm.direct_workers import shm_checks, socket_checks, stranger_is_refused
from tests.integration.comm.group import run_group


@pytest.mark.skipif(not shm_supported(), reason="needs /dev/shm on x86-64")
def test_shm_swaps_equal_gloo_and_a_dead_peer_is_noticed() -> None:
    """Pass: every swap (under and over the slot size, slots reused) equals the
    gloo swap of the same tensors, all-reduce sums are bit-identical to gloo's,
    set-up leaves no file in /dev/shm, and rank 0 learns of rank 1's exit in
    under 5 s instead of waiting for the 10 s timeout."""
    checks = run_group(shm_checks, 2, timeout_s=90)[0]
    bad = {k: v for k, v in checks.items() if v != "ok"}
    assert not bad, bad
    assert "dead_peer" in checks and "all_reduce:768" in checks


def test_auto_transport_uses_shm_only_for_a_loopback_group() -> None:
    """Pass: auto picks shared memory for ranks meeting on loopback, direct TCP
    for a group spread over other addresses; the other choices are kept."""
    assert TPConfig(master_addr="127.0.0.1").resolved_transport == "shm"
    assert TPConfig(master_addr="10.23.0.1").resolved_transport == "socket"
    assert TPConfig(master_addr="127.0.0.1", transport="gloo").resolved_transport == "gloo"
    assert TPConfig(master_addr="10.23.0.1", transport="shm").resolved_transport == "shm"
    with pytest.raises(ValueError, match="transport"):
        TPConfig(transport="rdma")


def test_socket_swaps_equal_gloo_and_a_dead_peer_is_noticed() -> None:
    """Pass: every swap up to 64 KB goes over the direct connection and equals
    the gloo swap, larger ones fall back to gloo, all-reduce sums equal gloo's
    bit for bit, and rank 0 learns of rank 1's exit in under 5 s."""
    checks = run_group(socket_checks, 2, timeout_s=90)[0]
    bad = {k: v for k, v in checks.items() if v != "ok"}
    assert not bad, bad
    assert "dead_peer" in checks and "small_swaps_took_socket" in checks


def test_socket_listener_refuses_a_peer_without_the_token() -> None:
    """Pass: a connection presenting a wrong token is dropped and the real
    rank still joins; the two ranks then swap their tensors."""
    for checks in run_group(stranger_is_refused, 2, timeout_s=60):
        assert checks == {"formed": "ok", "real_peer": "ok"}, checks
