"""Shared-memory exchanges between TP ranks on one host.

A decode step all-reduces one token x hidden twice per layer, so the latency
of a small swap decides inter-token latency. Through gloo a two-rank swap of
2 KB costs ~130-150 us on loopback TCP; through a shared mapping it is a
memcpy and a flag, a few microseconds. ShmTransport keeps gloo for everything
else (large messages, multi-peer rounds, collectives of the backend) and
takes the shared-memory path for `exchange` calls up to a slot's capacity.

Layout. Every rank creates one file in /dev/shm holding one region per peer
(this rank -> that peer). A region is a control line and NUM_SLOTS slots:

    control: [consumed int64] ... padded to 64 bytes (written by the reader)
    slot k:  [seq int64][nbytes int64] ... padded to 64 bytes, then capacity bytes

Exchange number n (counted per peer, the same on both sides because exchanges
are collective) writes slot n % NUM_SLOTS of the outbound region once the
reader has consumed exchange n - NUM_SLOTS, stores nbytes, then seq = n last.
The reader waits for seq == n in the peer's region, copies the payload out and
stores consumed = n. Stores become visible in program order on x86-64 (TSO),
which this ordering relies on, so `shm_supported` is false elsewhere.

Set-up is collective over gloo: the ranks swap file names and random nonces,
map each other's files, check the nonces, agree that every rank succeeded, and
then unlink their files (the mappings stay valid; nothing is left behind even
if a rank dies later). Files are created 0600 under a random name.

Waiting spins briefly, then yields, then sleeps in short steps; a peer that
stops answering raises after the group's timeout, and a peer process that has
exited is noticed within WATCH_S.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import secrets
import time
from dataclasses import dataclass

import torch

from serve.comm.collectives import Transport, fits_direct

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NUM_SLOTS = 2
LINE = 64
DEFAULT_SLOT_BYTES = 256 * 1024
NAME_BYTES = 64
SPIN_ITERS = 2000
YIELD_ITERS = 2000
SLEEP_S = 50e-6
WATCH_S = 0.5
# Control-line and slot-header words, as int64 indices into a region.
_CONSUMED = 0
_SEQ = 0
_NBYTES = 1


class ShmError(RuntimeError):
    pass


def shm_supported() -> bool:
    """Shared memory between ranks needs /dev/shm and x86-64's store order."""
    return platform.machine() in ("x86_64", "AMD64") and os.path.isdir(SHM_DIR)


@dataclass(frozen=True)
class RegionLayout:
    slot_bytes: int

    @property
    def slot_stride(self) -> int:
        return LINE + self.slot_bytes

    @property
    def region_bytes(self) -> int:
        return LINE + NUM_SLOTS * self.slot_stride

    def control_word(self, region: int) -> int:
        """int64 index of a region's consumed counter."""
        return region * self.region_bytes // 8 + _CONSUMED

    def slot_word(self, region: int, slot: int, word: int) -> int:
        return (region * self.region_bytes + LINE + slot * self.slot_stride) // 8 + word

    def slot_data(self, region: int, slot: int) -> int:
        """Byte offset of a slot's payload."""
        return region * self.region_bytes + LINE + slot * self.slot_stride + LINE


class _Mapping:
    """One shared file, mapped; `words` views it as int64, `data` as bytes."""

    def __init__(self, path: str, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ShmError(f"{path} has {os.fstat(fd).st_size} bytes, expected {size}")
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path
        self.data = memoryview(self.mm)
        self.words = self.data.cast("q")
        self.tensor = torch.frombuffer(self.mm, dtype=torch.uint8)

    def close(self) -> None:
        del self.tensor
        self.words.release()
        self.data.release()
        try:
            self.mm.close()
        except BufferError:  # a view is still alive; the mapping goes with it
            logger.debug("%s: mapping still referenced", self.path)


def _maps_file(pid: int, name: str) -> bool:
    """Whether pid, as this process sees it, has the named file mapped: only
    then is watching pid a way to notice the peer's exit (another pid
    namespace may show an unrelated process under that number)."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            return any(name in line for line in f)
    except OSError:
        return False


class ShmTransport(Transport):
    """A Transport whose small `exchange` calls go through shared memory."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        pg: object | None,
        *,
        outbound: _Mapping,
        inbound: dict[int, _Mapping],
        peer_pids: dict[int, int],
        layout: RegionLayout,
        timeout_s: float,
    ) -> None:
        super().__init__(rank, world_size, pg)
        self.layout = layout
        self.timeout_s = timeout_s
        self._out = outbound
        self._in = inbound
        self._peer_pids = peer_pids
        self._count = dict.fromkeys(inbound, 0)
        self.shm_exchanges = 0

    @property
    def slot_bytes(self) -> int:
        return self.layout.slot_bytes

    @classmethod
    def connect(
        cls,
        rank: int,
        world_size: int,
        pg: object | None = None,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        timeout_s: float = 30.0,
    ) -> ShmTransport | None:
        """Collective: maps every peer's file; None (on every rank) unless every
        rank could, e.g. when the ranks do not share a /dev/shm."""
        base = Transport(rank, world_size, pg)
        if base.is_nccl or world_size < 2:
            return None
        layout = RegionLayout(slot_bytes)
        ok = shm_supported()
        name = f"shardwire-tp-{secrets.token_hex(8)}-r{rank}"
        nonce = secrets.randbits(62)
        mine: _Mapping | None = None
        if ok:
            try:
                mine = _Mapping(os.path.join(SHM_DIR, name), world_size * layout.region_bytes, True)
                mine.words[0] = nonce  # region 0's consumed word, reset below
            except OSError as exc:
                logger.info("no shared memory for TP exchanges: %s", exc)
                ok = False
        ident = torch.zeros(NAME_BYTES + 16, dtype=torch.uint8)
        raw = name.encode()
        ident[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        ident[NAME_BYTES:].view(torch.int64)[0] = nonce
        ident[NAME_BYTES:].view(torch.int64)[1] = os.getpid()
        every = base.all_gather_bytes(ident, [ident.numel()] * world_size)
        inbound: dict[int, _Mapping] = {}
        pids: dict[int, int] = {}
        if ok:
            try:
                for peer in range(world_size):
                    if peer == rank:
                        continue
                    their = every[peer]
                    peer_name = bytes(their[:NAME_BYTES].tolist()).rstrip(b"\0").decode()
                    peer_nonce, peer_pid = their[NAME_BYTES:].view(torch.int64).tolist()
                    m = _Mapping(
                        os.path.join(SHM_DIR, peer_name), world_size * layout.region_bytes, False
                    )
                    inbound[peer] = m
                    if m.words[0] != peer_nonce:
                        raise ShmError(f"{peer_name} holds another rank's nonce")
                    pids[peer] = int(peer_pid) if _maps_file(int(peer_pid), peer_name) else 0
            except (OSError, ShmError, UnicodeDecodeError) as exc:
                logger.info("no shared memory for TP exchanges: %s", exc)
                ok = False
        # Every rank has read every nonce before anyone clears its own.
        flags = base.all_gather_lengths(int(ok))
        if mine is not None:
            mine.words[0] = 0
            os.unlink(mine.path)
        if not all(flags):
            for m in inbound.values():
                m.close()
            if mine is not None:
                mine.close()
            return None
        base.sync()
        logger.info("TP rank %d: exchanges up to %d bytes through shared memory", rank, slot_bytes)
        assert mine is not None
        return cls(
            rank,
            world_size,
            pg,
            outbound=mine,
            inbound=inbound,
            peer_pids=pids,
            layout=layout,
            timeout_s=timeout_s,
        )

    def close(self) -> None:
        for m in self._in.values():
            m.close()
        self._in.clear()
        self._out.close()

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        if peer not in self._in or not fits_direct(send, recv, self.layout.slot_bytes):
            super().exchange(send, recv, peer)
            return
        n = self._count[peer] + 1
        self._count[peer] = n
        slot = n % NUM_SLOTS
        lay = self.layout
        out, inb = self._out, self._in[peer]
        # Send: wait until the peer consumed what this slot held, write, publish.
        self._wait(out.words, lay.control_word(peer), n - NUM_SLOTS, peer)
        src = send.reshape(-1).view(torch.uint8)
        start = lay.slot_data(peer, slot)
        out.tensor[start : start + src.numel()].copy_(src)
        out.words[lay.slot_word(peer, slot, _NBYTES)] = src.numel()
        out.words[lay.slot_word(peer, slot, _SEQ)] = n
        self.bytes_sent += src.numel()
        # Receive: the peer's region addressed to this rank.
        self._wait(inb.words, lay.slot_word(self.rank, slot, _SEQ), n, peer)
        size = inb.words[lay.slot_word(self.rank, slot, _NBYTES)]
        dst = recv.reshape(-1).view(torch.uint8)
        if not 0 <= size <= dst.numel():
            raise ShmError(f"peer {peer} wrote {size} bytes into a {dst.numel()}-byte receive")
        start = lay.slot_data(self.rank, slot)
        dst[:size].copy_(inb.tensor[start : start + size])
        inb.words[lay.control_word(self.rank)] = n
        self.shm_exchanges += 1

    def _wait(self, words: memoryview, index: int, target: int, peer: int) -> None:
        """Until words[index] >= target: spin, then yield, then sleep."""
        if words[index] >= target:
            return
        for _ in range(SPIN_ITERS):
            if words[index] >= target:
                return
        for _ in range(YIELD_ITERS):
            os.sched_yield()
            if words[index] >= target:
                return
        start = time.monotonic()
        watched = start
        while words[index] < target:
            time.sleep(SLEEP_S)
            now = time.monotonic()
            if now - watched > WATCH_S:
                watched = now
                self._check_peer(peer)
            if now - start > self.timeout_s:
                raise ShmError(
                    f"TP rank {self.rank}: no answer from rank {peer} in {self.timeout_s:.0f} s"
                )

    def _check_peer(self, peer: int) -> None:
        pid = self._peer_pids.get(peer, 0)
        if pid > 0 and not _is_running(pid):
            raise ShmError(f"TP rank {self.rank}: rank {peer} (pid {pid}) has exited")


def _is_running(pid: int) -> bool:
    """False once the process is gone or a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
