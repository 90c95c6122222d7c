"""The tensor-parallel group a model's layers communicate through, and the
channel that carries step plans from the leader to the other ranks.

A group of size 1 is the single-process path: every collective is the identity,
so one device runs exactly the code that N ranks run.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from serve.dist.plan import (
    HEADER_LEN,
    MAX_BLOCKS_PER_SEQ,
    PlanError,
    PlanLimits,
    StepPlan,
    check_header,
    pack,
    unpack,
)

logger = logging.getLogger(__name__)


class Collectives(Protocol):
    """What layers need from the communication layer (serve.comm)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor: ...


@dataclass(frozen=True)
class OverlapPolicy:
    """Micro-chunked steps: a step of at least `min_tokens` tokens is cut into
    `num_chunks` pieces of consecutive tokens; each piece's all-reduces run on
    a comm thread while the next piece computes (serve.model.overlap).
    min_tokens 0 or num_chunks < 2: off. Every rank must hold the same policy.

    Measured on CPU ranks (`shardwire bench tp`): it pays when the pieces'
    all-reduces are bound by the link (the comm thread mostly waits), and
    loses when a codec's encode/decode competes with the matmuls for the same
    cores; hence `link_bound_only`."""

    min_tokens: int = 0
    num_chunks: int = 2
    # Pieces smaller than this are not worth a message of their own.
    min_chunk_tokens: int = 64
    # Cut a step only when its pieces' all-reduces are bound by the link (they go
    # uncompressed: no codec work competes with the next piece's matmuls).
    link_bound_only: bool = True
    # Seconds of one decoder layer's matmuls per prompt token on the slowest rank
    # (measured when the group forms; 0: unknown). With it, a step whose all-reduces
    # `auto` would code may instead go uncompressed and cut, when hiding the link
    # behind the next piece's compute is predicted to beat coding (serve.model.overlap).
    layer_s_per_token: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.min_tokens > 0 and self.num_chunks >= 2


@dataclass
class ParallelGroup:
    """This rank's view of its TP group. `comm` is attached once the process
    group exists (layers are built before, while weights load)."""

    rank: int = 0
    size: int = 1
    comm: Collectives | None = None
    overlap: OverlapPolicy = field(default_factory=OverlapPolicy)
    _comm_thread: ThreadPoolExecutor | None = field(default=None, repr=False, compare=False)
    # serve.model.overlap.exact_beats_coding's answers by step shape (the link and
    # compute numbers it reads are fixed once the group forms).
    exact_decisions: dict[tuple, bool] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def single(cls) -> ParallelGroup:
        return cls()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks."""
        if self.size == 1:
            return x
        return self.comm.all_reduce(x)  # type: ignore[union-attr]

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along dim."""
        if self.size == 1:
            return x
        return self.comm.all_gather(x, dim)  # type: ignore[union-attr]

    def all_reduce_async(self, x: torch.Tensor) -> Future[torch.Tensor]:
        """all_reduce(x) on this rank's comm thread; `.result()` waits for it.
        Collectives queue in submission order, so ranks that submit in the
        same order meet in the same order; the caller must wait for every one
        before issuing a collective of its own."""
        if self.size == 1:
            done: Future[torch.Tensor] = Future()
            done.set_result(x)
            return done
        if self._comm_thread is None:
            self._comm_thread = ThreadPoolExecutor(1, thread_name_prefix=f"tp{self.rank}-comm")
        inference = torch.is_inference_mode_enabled()
        return self._comm_thread.submit(self._reduce_on_thread, x, inference)

    def _reduce_on_thread(self, x: torch.Tensor, inference: bool) -> torch.Tensor:
        with torch.inference_mode(inference):
            return self.all_reduce(x)

    def shard(self, n: int, what: str) -> int:
        """The per-rank share of n items, which must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the TP size ({self.size})")
        return n // self.size


def init_process_group(
    rank: int, size: int, master_addr: str, master_port: int, timeout_s: float
) -> None:
    """Joins the TP group over gloo: the engine keeps its model and KV cache on the
    CPU, so every tensor between ranks (plans, KV ops, activations) is a CPU
    tensor, which NCCL cannot carry, also on a host with GPUs. The timeout
    bounds every collective, so a dead or hung rank is noticed in seconds."""
    backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        store=rendezvous_store(rank, size, master_addr, master_port, timeout),
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    logger.info(
        "rank %d/%d joined the %s group at %s:%d", rank, size, backend, master_addr, master_port
    )


def rendezvous_store(
    rank: int, size: int, master_addr: str, master_port: int, timeout: timedelta
) -> dist.TCPStore:
    """The group's rendezvous store. Rank 0 hosts it on a socket bound to
    master_addr when that is an IP address of this host (torch's own listener
    takes every interface); a host name, or an address that is not this host's
    (NAT, a proxy), leaves it on every interface, since a name may resolve to
    another of this host's addresses than the one the other ranks reach."""
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, size, False, timeout=timeout)
    host = _ip_literal(master_addr)
    try:
        listener = _listen(host, master_port)
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL:
            raise
        logger.warning(
            "%s is not an address of this host; the TP rendezvous listens on every interface",
            master_addr,
        )
        listener = _listen("", master_port)
    fd = listener.detach()  # the store owns the socket from here
    return dist.TCPStore(master_addr, master_port, size, True, timeout=timeout, master_listen_fd=fd)


def _ip_literal(host: str) -> str:
    """host when it is an IP address ('localhost': 127.0.0.1), else '' (every interface)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return ""


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


PLAN_STEP, PLAN_HEARTBEAT, PLAN_STOP = 0, 1, 2
# KV moves of a TP replica: every rank reads (or writes) its KV heads of some tokens.
PLAN_KV_READ, PLAN_KV_WRITE = 3, 4
# Tokens one KV op may cover (KV moves go in chunks far below this).
MAX_KV_OP_TOKENS = 1 << 16
# gloo tag of the KV heads a rank hands the leader for a step's taps (sent from
# inside the forward pass, while the comm thread may have all-reduces in flight).
TAP_TAG = 0x5354
# KV travels between ranks as the integers of its bits (exact, any float dtype).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class KvOp:
    """Tokens [start, stop) of a sequence whose blocks are `block_table`, in one layer."""

    layer: int
    start: int
    stop: int
    block_table: list[int]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.element_size()])


class PlanChannel:
    """Leader -> ranks: step plans, heartbeats while idle, and stop; and, between
    steps, KV ops that read or write every rank's KV heads of a few tokens (KV
    moves of a TP replica: the wire carries all heads, each rank holds its own).
    Inside a step whose plan has taps, each rank sends the leader its heads of the
    tapped tokens after every layer (`tap_send`, `tap_gather`).

    Each message is a kind tensor, then (for steps) the packed header and
    payload, (for KV ops) the block table, then the KV itself. Two ranks use
    send/recv (far cheaper than broadcast on gloo)."""

    def __init__(self, rank: int, size: int, heartbeat_s: float = 1.0) -> None:
        self.rank = rank
        self.size = size
        self.heartbeat_s = heartbeat_s
        self._last_sent = time.monotonic()
        # Set on the receiving ranks once their model and KV pool exist: plans are
        # checked against them.
        self.limits: PlanLimits | None = None

    def _send(self, t: torch.Tensor) -> None:
        if self.size == 2:
            dist.send(t, dst=1)
        else:
            dist.broadcast(t, src=0)

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        if self.size == 2:
            dist.recv(t, src=0)
        else:
            dist.broadcast(t, src=0)
        return t

    def send_plan(self, plan: StepPlan) -> None:
        header, payload = pack(plan)
        self._send(torch.cat([torch.tensor([PLAN_STEP]), header]))
        self._send(payload)
        self._last_sent = time.monotonic()

    def heartbeat(self) -> None:
        """Tells idle ranks the leader lives (they would time out otherwise)."""
        if time.monotonic() - self._last_sent >= self.heartbeat_s:
            self._send(torch.tensor([PLAN_HEARTBEAT] + [0] * HEADER_LEN))
            self._last_sent = time.monotonic()

    def stop(self) -> None:
        self._send(torch.tensor([PLAN_STOP] + [0] * HEADER_LEN))

    def recv(self) -> tuple[int, StepPlan | KvOp | None]:
        msg = self._recv(torch.empty(1 + HEADER_LEN, dtype=torch.long))
        kind = int(msg[0])
        if kind in (PLAN_KV_READ, PLAN_KV_WRITE):
            return kind, self._recv_kv_op(msg[1:])
        if kind != PLAN_STEP:
            return kind, None
        header = msg[1:]
        payload = self._recv(torch.empty(check_header(header, self.limits), dtype=torch.long))
        return kind, unpack(header, payload, self.limits)

    # -- KV ops ---------------------------------------------------------------------------

    def _send_kv_op(self, kind: int, op: KvOp) -> None:
        fields = [kind, op.layer, op.start, op.stop, len(op.block_table)]
        self._send(torch.tensor(fields + [0] * (1 + HEADER_LEN - len(fields))))
        self._send(torch.tensor(op.block_table, dtype=torch.long))
        self._last_sent = time.monotonic()

    def _recv_kv_op(self, header: torch.Tensor) -> KvOp:
        """The op the leader announced, refused (PlanError) before anything sized by
        it is allocated when it falls outside this rank's model and KV pool."""
        layer, start, stop, table_len = (int(x) for x in header[:4])
        limits = self.limits
        if not 0 <= table_len <= MAX_BLOCKS_PER_SEQ:
            raise PlanError(f"KV op: block table of {table_len} blocks")
        if not 0 <= start < stop or stop - start > MAX_KV_OP_TOKENS:
            raise PlanError(f"KV op: tokens [{start}, {stop})")
        if limits is not None:
            if stop > limits.max_model_len or -(-stop // limits.block_size) > table_len:
                raise PlanError(f"KV op: tokens up to {stop} do not fit {table_len} blocks")
            if limits.num_layers and layer >= limits.num_layers:
                raise PlanError(f"KV op: layer {layer} of {limits.num_layers}")
        if layer < 0:
            raise PlanError(f"KV op: layer {layer}")
        table = self._recv(torch.empty(table_len, dtype=torch.long))
        if limits is not None and table_len and not (
            0 <= int(table.min()) and int(table.max()) < limits.num_blocks
        ):
            raise PlanError(f"KV op: block ids outside the pool of {limits.num_blocks}")
        return KvOp(layer, start, stop, table.tolist())

    def kv_read(self, op: KvOp, mine: torch.Tensor) -> list[torch.Tensor]:
        """Leader: every rank's KV of op ([2, n, local heads, head_dim] each, in rank
        order); `mine` is the leader's own."""
        self._send_kv_op(PLAN_KV_READ, op)
        return self._gather(mine, tag=0)

    def tap_gather(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Leader, inside a step with taps: every rank's heads of one tap after one
        layer ([2, n, local heads, head_dim] each, in rank order)."""
        return self._gather(mine, tag=TAP_TAG)

    def _gather(self, mine: torch.Tensor, tag: int) -> list[torch.Tensor]:
        pieces = [mine]
        for rank in range(1, self.size):
            piece = torch.empty_like(as_bits(mine))
            dist.recv(piece, src=rank, tag=tag)
            pieces.append(piece.view(mine.dtype))
        return pieces

    def tap_send(self, mine: torch.Tensor) -> None:
        """A rank's part of tap_gather."""
        dist.send(as_bits(mine), dst=0, tag=TAP_TAG)

    def kv_read_reply(self, mine: torch.Tensor) -> None:
        """A rank's part of kv_read: its KV of the op to the leader."""
        dist.send(as_bits(mine), dst=0)

    def kv_write(self, op: KvOp, kv: torch.Tensor) -> None:
        """Leader: the KV of op, every head ([2, n, heads, head_dim]), to every rank."""
        self._send_kv_op(PLAN_KV_WRITE, op)
        self._send(torch.tensor(list(kv.shape), dtype=torch.long))
        self._send(as_bits(kv))

    def kv_write_recv(self, op: KvOp, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """A rank's part of kv_write: the whole KV of op, every head."""
        shape = self._recv(torch.empty(4, dtype=torch.long)).tolist()
        if shape != [2, op.stop - op.start, heads, head_dim]:
            raise PlanError(f"KV op: KV of shape {shape}, expected [2, {op.stop - op.start}, "
                            f"{heads}, {head_dim}]")  # fmt: skip
        bits = torch.empty(shape, dtype=_BITS[torch.empty((), dtype=dtype).element_size()])
        return self._recv(bits).view(dtype)
