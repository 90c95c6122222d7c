"""What each rank of a direct-transport (shared memory, TCP) test group runs
(importable by spawned ranks)."""

from __future__ import annotations

import glob
import os
import socket
import time

import torch

from serve.comm.collectives import CommConfig, Communicator, Transport, tree_sum
from serve.comm.shm import SHM_DIR, ShmError, ShmTransport
from serve.comm.sockets import SocketTransport, SocketTransportError
from tests.integration.comm.group import CheckList, Checks

SLOT_BYTES = 16 * 1024
MAX_SOCKET_FLOATS = 64 * 1024 // 4


def _swaps_match_gloo(
    cl: CheckList,
    direct: Transport,
    gloo: Transport,
    rank: int,
    sizes: tuple[int, ...],
    reps: int,
    bf16_rep: int = -1,
) -> None:
    """Swaps x with the other rank through `direct` and through gloo, `reps` times per
    size (repetition `bf16_rep` in bfloat16): both must deliver the same bits."""
    for n in sizes:
        for rep in range(reps):
            g = torch.Generator().manual_seed(100 * rank + n + rep)
            x = torch.randn(n, generator=g).to(torch.bfloat16 if rep == bf16_rep else torch.float32)
            via_direct = torch.empty_like(x)
            via_gloo = torch.empty_like(x)
            direct.exchange(x, via_direct, 1 - rank)
            gloo.exchange(x, via_gloo, 1 - rank)
            with cl.check(f"exchange:{n}"):
                assert torch.equal(via_direct, via_gloo), f"{n} elements differ"


def shm_checks(rank: int, world: int) -> Checks:
    cl = CheckList()
    before = set(glob.glob(os.path.join(SHM_DIR, "shardwire-tp-*")))
    shm = ShmTransport.connect(rank, world, slot_bytes=SLOT_BYTES, timeout_s=10)
    with cl.check("connect"):
        assert shm is not None, "shared memory set-up failed on one host"
    assert shm is not None
    with cl.check("no_files_left"):
        left = set(glob.glob(os.path.join(SHM_DIR, "shardwire-tp-*"))) - before
        assert not left, f"set-up left {sorted(left)}"
    gloo = Transport(rank, world)
    # Swaps of many sizes, over and under the slot, each checked against gloo; more
    # swaps than slots, so slots are reused.
    sizes = (1, 7, 896, SLOT_BYTES // 4, SLOT_BYTES // 4 + 1, 40000)
    _swaps_match_gloo(cl, shm, gloo, rank, sizes, reps=5)
    with cl.check("small_swaps_took_shm"):
        # 4 sizes fit a slot, 5 repetitions each.
        assert shm.shm_exchanges == 20, shm.shm_exchanges
    # Framed variable-length swaps land in a larger receive.
    mine = torch.arange(10 + rank * 5, dtype=torch.uint8)
    theirs = shm.exchange_bytes(mine, 1 - rank, max_length=64)
    with cl.check("framed"):
        assert theirs.tolist() == list(range(10 + (1 - rank) * 5)), theirs.tolist()
    # A Communicator on shared memory gives the exact sums the gloo one does.
    config = CommConfig(transport="shm", timeout_s=10)
    comm = Communicator.start(rank, world, config)
    plain = Communicator(rank, world, CommConfig())
    with cl.check("communicator_uses_shm"):
        assert isinstance(comm.transport, ShmTransport)
    for n in (1, 768, 3000, 100_000):
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank * 7 + n))
        a = comm.all_reduce(x)
        b = plain.all_reduce(x)
        parts = [torch.empty_like(x), torch.empty_like(x)]
        parts[rank] = x
        gloo.exchange(x, parts[1 - rank], 1 - rank)
        with cl.check(f"all_reduce:{n}"):
            assert torch.equal(a, b), "shm and gloo sums differ"
            assert torch.equal(a, tree_sum(parts)), "not the tree-ordered sum"
    # Latency, for the record (not asserted): 1 x 896 bf16.
    x = torch.zeros(1, 896, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for t in (shm, gloo):
        for _ in range(20):
            t.exchange(x, y, 1 - rank)
    # A peer that exits is noticed well before the timeout.
    if rank == 1:  # leaves without another exchange; its process then exits
        shm.close()
        return cl.results
    start = time.monotonic()
    with cl.check("dead_peer"):
        try:
            shm.exchange(torch.zeros(4), torch.empty(4), 1)
        except ShmError as exc:
            assert "exited" in str(exc), str(exc)
            took = time.monotonic() - start
            assert took < 5, f"noticed after {took:.1f} s"
        else:
            raise AssertionError("an exchange with an exited rank returned")
    shm.close()
    return cl.results


def socket_checks(rank: int, world: int) -> Checks:
    cl = CheckList()
    gloo = Transport(rank, world)
    # A stranger connects to each listener before the real peers: it is refused,
    # and the group still forms.
    direct = SocketTransport.connect(rank, world, bind_host="127.0.0.1", timeout_s=10)
    with cl.check("connect"):
        assert direct is not None, "direct TCP set-up failed"
    assert direct is not None
    sizes = (1, 896, 4096, MAX_SOCKET_FLOATS, MAX_SOCKET_FLOATS + 1, 40000)
    _swaps_match_gloo(cl, direct, gloo, rank, sizes, reps=3, bf16_rep=1)
    with cl.check("small_swaps_took_socket"):
        # Up to 64 KB: sizes 1, 896, 4096 and MAX_SOCKET_FLOATS (3 each), plus the bf16
        # repetition of MAX_SOCKET_FLOATS + 1.
        assert direct.direct_exchanges == 13, direct.direct_exchanges
    mine = torch.arange(3 + rank, dtype=torch.uint8)
    with cl.check("framed"):
        assert direct.exchange_bytes(mine, 1 - rank, max_length=16).tolist() == list(
            range(3 + (1 - rank))
        )
    comm = Communicator.start(rank, world, CommConfig(transport="socket", bind_host="127.0.0.1"))
    plain = Communicator(rank, world, CommConfig())
    with cl.check("communicator_uses_socket"):
        assert isinstance(comm.transport, SocketTransport)
    for n in (1, 768, 3000, 100_000):
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank * 7 + n))
        with cl.check(f"all_reduce:{n}"):
            assert torch.equal(comm.all_reduce(x), plain.all_reduce(x)), "sums differ"
    if rank == 1:  # leaves; its process exit closes the connection
        direct.close()
        return cl.results
    start = time.monotonic()
    with cl.check("dead_peer"):
        try:
            direct.exchange(torch.zeros(4), torch.empty(4), 1)
        except SocketTransportError as exc:
            took = time.monotonic() - start
            assert took < 5, f"noticed after {took:.1f} s ({exc})"
        else:
            raise AssertionError("an exchange with a departed rank returned")
    direct.close()
    return cl.results


def stranger_is_refused(rank: int, world: int) -> Checks:
    """Rank 0 listens; before rank 1 connects, a stranger with a wrong token
    connects first. The group must still form with the real peer."""
    cl = CheckList()
    import threading

    from serve.comm import sockets

    if rank == 0:
        real_pair_up = sockets._pair_up

        def pair_up_with_stranger(rank_, world_, listener, token, every, max_bytes):  # type: ignore[no-untyped-def]
            port = listener.getsockname()[1]

            def stranger() -> None:
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(sockets._HELLO.pack(1, b"x" * sockets.TOKEN_BYTES))
                    time.sleep(0.5)

            t = threading.Thread(target=stranger)
            t.start()
            time.sleep(0.2)  # the stranger is first in the accept queue
            try:
                return real_pair_up(rank_, world_, listener, token, every, max_bytes)
            finally:
                t.join()

        sockets._pair_up = pair_up_with_stranger
    direct = SocketTransport.connect(rank, world, bind_host="127.0.0.1", timeout_s=10)
    with cl.check("formed"):
        assert direct is not None
    assert direct is not None
    x = torch.full((8,), float(rank))
    y = torch.empty(8)
    direct.exchange(x, y, 1 - rank)
    with cl.check("real_peer"):
        assert torch.equal(y, torch.full((8,), float(1 - rank)))
    direct.close()
    return cl.results
