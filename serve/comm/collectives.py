"""Collectives for a tensor-parallel group: exact and compressed all-reduce,
all-gather and broadcast over torch.distributed point-to-point messages.

Two regimes, one rule for both:
- Small messages are a latency problem. Two ranks swap their tensors with one
  isend/irecv pair and add locally; more ranks (a power of two) use recursive
  doubling, log2(N) pairwise swaps.
- Large messages are a bandwidth problem. A lossy or lossless codec turns each
  rank's tensor into uint8 bytes, the bytes are exchanged, and every rank
  decodes and sums locally. Only uint8 crosses the wire (gloo has no float8 and
  wraps int8 sums). Two ranks pipeline the exchange in chunks of whole codec
  blocks (chunk k+1 is encoded while chunk k is on the wire and decoded as it
  lands); more ranks use reduce-scatter then all-gather ("two-shot") for large
  messages. Uncompressed large messages beyond two ranks take the backend's
  ring all-reduce.

The rule: the sum order is a fixed pairwise tree over rank order,
((r0 + r1) + (r2 + r3)) ..., and a lossy rank uses the decoded copy of its own
contribution, never its exact tensor, so every rank adds the same values in the
same order and all ranks get bit-identical results. Tensor parallelism depends
on it: ranks that disagree by one ulp drift apart. Chunks are whole codec
blocks, so a split message decodes to the same bits as an unsplit one.

Only point-to-point messages and collectives that gloo and NCCL both have are
used (isend/irecv, all_gather, broadcast), no object collectives, no pickle.
Pipelining and framed variable-length messages (a length word, then the
payload, received into a buffer of the largest possible size) are gloo-only;
NCCL swaps lengths first and sends each message whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from serve.comm.codecs import CodecSpec, decode_from_uint8, encode_to_uint8, max_encoded_nbytes

if TYPE_CHECKING:
    from serve.comm.linkmodel import LinkModel

logger = logging.getLogger(__name__)

POLICIES = ("exact", "lossless", "lossy")
# Codec names a CommConfig accepts besides the names of serve.comm.codecs.
AUTO = "auto"
NONE = "none"
MAX_PIPELINE_CHUNKS = 64
# gloo tag of every point-to-point message here: other traffic between the same
# ranks (step plans) can never be matched with a collective's.
COMM_TAG = 0x5357
# A framed message: an int64 payload length, then the payload.
_LENGTH_BYTES = 8
# Slots of the broadcast header: dtype code, ndim, then the shape.
_MAX_NDIM = 8
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


@dataclass(frozen=True)
class CommConfig:
    # none|lossless|int8|fp8|int4 (each lossy one optionally +zstd) | auto
    codec: str = NONE
    # The policy `auto` stays within: exact -> none; lossless -> none|lossless;
    # lossy -> every codec. Fixed codecs ignore it.
    accuracy: str = "exact"
    zstd_level: int = 1
    # Below this many bytes a fixed codec is bypassed: the message takes the
    # uncompressed latency path (auto asks the link model at every size).
    small_message_bytes: int = 64 * 1024
    # Uncompressed messages from this size take the bandwidth path (gloo's or
    # NCCL's ring all-reduce) when there are more than two ranks.
    ring_bytes: int = 256 * 1024
    # Compressed messages from this size use reduce-scatter + all-gather
    # ("two-shot") when there are more than two ranks.
    two_shot_bytes: int = 1024 * 1024
    # Coded two-rank messages of at least two such chunks are cut into chunks
    # of about this many raw bytes (at most MAX_PIPELINE_CHUNKS): chunk k+1 is
    # encoded while chunk k is on the wire and decoded as it lands. 0: off.
    pipeline_chunk_bytes: int = 256 * 1024
    # How two ranks swap small messages: gloo; shm, shared memory between ranks
    # on one host (serve.comm.shm, up to 256 KB); socket, direct TCP connections
    # (serve.comm.sockets, up to 64 KB, listening on bind_host). gloo carries
    # everything the direct paths do not.
    transport: str = "gloo"
    bind_host: str = ""
    # How long a direct exchange may wait before the peer counts as gone.
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.accuracy not in POLICIES:
            raise ValueError(f"comm accuracy must be one of {POLICIES}, got {self.accuracy!r}")
        sizes = (
            self.small_message_bytes,
            self.two_shot_bytes,
            self.ring_bytes,
            self.pipeline_chunk_bytes,
        )
        if min(sizes) < 0:
            raise ValueError("comm message thresholds must be >= 0")
        if self.transport not in ("gloo", "shm", "socket"):
            raise ValueError(f"comm transport must be gloo, shm or socket, got {self.transport!r}")


@dataclass
class CodecCounters:
    messages: int = 0
    raw_bytes: int = 0  # input tensor bytes, once per collective
    wire_bytes: int = 0  # bytes this rank sent for it (payloads and length words)
    seconds: float = 0.0


@dataclass
class CommStats:
    """Per-codec counters of this rank's collectives, for metrics."""

    by_codec: dict[str, CodecCounters] = field(default_factory=dict)

    def record(self, codec: str, raw_bytes: int, wire_bytes: int, seconds: float) -> None:
        c = self.by_codec.setdefault(codec, CodecCounters())
        c.messages += 1
        c.raw_bytes += raw_bytes
        c.wire_bytes += wire_bytes
        c.seconds += seconds

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {name: asdict(c) for name, c in sorted(self.by_codec.items())}

    def reset(self) -> None:
        self.by_codec.clear()


def make_spec(name: str, zstd_level: int = 1) -> CodecSpec:
    """The CodecSpec for a codec name (e.g. "int8+zstd") at the given zstd level."""
    return CodecSpec.parse(name, zstd_level=zstd_level)


def tree_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sums tensors pairwise in rank order: ((p0 + p1) + (p2 + p3)) + ...; the
    same tree recursive doubling builds, so every path adds in one order."""
    level = list(parts)
    while len(level) > 1:
        nxt = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def frame(payload: torch.Tensor) -> torch.Tensor:
    """[int64 length | payload] as one flat uint8 tensor."""
    word = torch.tensor([payload.numel()], dtype=torch.int64, device=payload.device)
    return torch.cat([word.view(torch.uint8), payload])


def unframe(buf: torch.Tensor) -> torch.Tensor:
    """The payload of a framed message received into buf (which may be longer)."""
    if buf.numel() < _LENGTH_BYTES:
        raise ValueError(f"framed message of {buf.numel()} bytes has no length word")
    n = int(buf[:_LENGTH_BYTES].view(torch.int64).item())
    if not 0 <= n <= buf.numel() - _LENGTH_BYTES:
        raise ValueError(f"framed message declares {n} bytes, holds at most {buf.numel() - 8}")
    return buf[_LENGTH_BYTES : _LENGTH_BYTES + n]


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: object | None) -> None:
    """Every rank's equal-sized inp, concatenated into out (one collective)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _checked_length(n: int, max_length: int | None, peer: int) -> int:
    """A message length a peer announced, refused when negative or over the bound."""
    if n < 0 or (max_length is not None and n > max_length):
        raise ValueError(f"rank {peer} announced a {n}-byte message; at most {max_length} fit")
    return n


def fits_direct(send: torch.Tensor, recv: torch.Tensor, max_bytes: int) -> bool:
    """Whether a swap may take a direct (non-gloo) path of max_bytes: contiguous
    CPU tensors on both sides, neither larger than the bound. Both ranks decide
    alike, since a swap's receive on one side is the other's send."""
    nbytes = max(send.numel() * send.element_size(), recv.numel() * recv.element_size())
    return (
        nbytes <= max_bytes
        and send.device.type == "cpu"
        and recv.device.type == "cpu"
        and send.is_contiguous()
        and recv.is_contiguous()
    )


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Transport:
    """Point-to-point exchanges between the ranks of one process group; every
    method is collective over the ranks it names. `bytes_sent` counts payloads."""

    def __init__(self, rank: int, world_size: int, pg: object | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.pg = pg
        self.bytes_sent = 0
        self.backend = dist.get_backend(pg) if world_size > 1 else "gloo"
        self.is_nccl = self.backend == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.is_nccl
            else torch.device("cpu")
        )

    def _p2p(
        self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]
    ) -> None:
        """Posts every receive and send at once, then waits for all of them."""
        for t, _ in sends:
            self.bytes_sent += t.numel() * t.element_size()
        if self.is_nccl:
            # NCCL needs matched send/recv pairs launched as one group.
            ops = [
                dist.P2POp(dist.irecv, t, group=self.pg, group_peer=p, tag=COMM_TAG)
                for t, p in recvs
            ]
            ops += [
                dist.P2POp(dist.isend, t, group=self.pg, group_peer=p, tag=COMM_TAG)
                for t, p in sends
            ]
            works = dist.batch_isend_irecv(ops)
        else:
            works = [dist.irecv(t, group=self.pg, group_src=p, tag=COMM_TAG) for t, p in recvs]
            works += [dist.isend(t, group=self.pg, group_dst=p, tag=COMM_TAG) for t, p in sends]
        for w in works:
            if w is not None:
                w.wait()

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
        """Swaps send for the peer's tensor of recv's size."""
        self._p2p([(send, peer)], [(recv, peer)])

    def exchange_bytes(
        self,
        send: torch.Tensor,
        peer: int,
        length: int | None = None,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Swaps a flat uint8 buffer with the peer. When the peer's length is not
        known (length=None): on gloo, with a bound (max_length), one framed
        message lands in a receive of the bound's size (gloo accepts a shorter
        message); otherwise the two lengths are swapped first."""
        if length is None and max_length is not None and not self.is_nccl:
            recv = torch.empty(max_length + _LENGTH_BYTES, dtype=torch.uint8, device=self.device)
            self.exchange(frame(send), recv, peer)
            return unframe(recv)
        if length is None:
            mine = torch.tensor([send.numel()], dtype=torch.int64, device=self.device)
            theirs = torch.empty_like(mine)
            self.exchange(mine, theirs, peer)
            length = _checked_length(int(theirs.item()), max_length, peer)
        recv = torch.empty(length, dtype=torch.uint8, device=self.device)
        self.exchange(send, recv, peer)
        return recv

    def all_gather_lengths(self, n: int) -> list[int]:
        """Every rank's n, in rank order."""
        mine = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        mine[self.rank] = n
        if _is_pow2(self.world_size):
            # Recursive doubling: known slots are disjoint, so adding merges them.
            step = 1
            while step < self.world_size:
                theirs = torch.empty_like(mine)
                self.exchange(mine, theirs, self.rank ^ step)
                mine = mine + theirs
                step *= 2
            return [int(v) for v in mine.tolist()]
        one = torch.tensor([n], dtype=torch.int64, device=self.device)
        out = torch.empty(self.world_size, dtype=torch.int64, device=self.device)
        self.bytes_sent += 8 * (self.world_size - 1)
        _all_gather_flat(out, one, group=self.pg)
        return [int(v) for v in out.tolist()]

    def all_gather_bytes(
        self,
        buf: torch.Tensor,
        lengths: list[int] | None = None,
        max_length: int | None = None,
    ) -> list[torch.Tensor]:
        """Every rank's flat uint8 buffer, in rank order (buf itself at this
        rank's slot). lengths: every rank's length when known in advance;
        max_length: a bound on every rank's length when not."""
        world, rank = self.world_size, self.rank
        if world == 2:
            peer = 1 - rank
            known = None if lengths is None else lengths[peer]
            theirs = self.exchange_bytes(buf, peer, known, max_length)
            return [buf, theirs] if rank == 0 else [theirs, buf]
        if lengths is None:
            lengths = [
                _checked_length(n, max_length, r)
                for r, n in enumerate(self.all_gather_lengths(buf.numel()))
            ]
        if _is_pow2(world):
            # Recursive doubling: at each step swap the whole block of
            # buffers held so far with the partner block's holder.
            held = {rank: buf}
            step = 1
            while step < world:
                peer = rank ^ step
                base = (peer // step) * step
                theirs = torch.empty(
                    sum(lengths[base : base + step]), dtype=torch.uint8, device=self.device
                )
                mine = torch.cat([held[r] for r in sorted(held)])
                self.exchange(mine, theirs, peer)
                for r, part in zip(
                    range(base, base + step),
                    torch.split(theirs, lengths[base : base + step]),
                    strict=True,
                ):
                    held[r] = part
                step *= 2
            return [held[r] for r in range(world)]
        width = max(lengths)
        padded = torch.zeros(width, dtype=torch.uint8, device=self.device)
        padded[: buf.numel()] = buf
        out = torch.empty(world * width, dtype=torch.uint8, device=self.device)
        self.bytes_sent += width * (world - 1)
        _all_gather_flat(out, padded, group=self.pg)
        return [out[r * width : r * width + lengths[r]] for r in range(world)]

    def all_to_all_bytes(
        self,
        bufs: list[torch.Tensor | None],
        length: int | None = None,
        max_length: int | None = None,
    ) -> list[torch.Tensor | None]:
        """Sends bufs[r] to rank r (bufs[self.rank] is None) and returns what
        each rank sent here (None at this rank's slot). length: the size of
        every buffer coming here, when known; else the lengths go first, and
        one beyond max_length is refused before anything is allocated."""
        world, rank = self.world_size, self.rank
        peers = [r for r in range(world) if r != rank]
        incoming = dict.fromkeys(peers, length)
        if length is None:
            lens_out = {
                r: torch.tensor([bufs[r].numel()], dtype=torch.int64, device=self.device)  # type: ignore[union-attr]
                for r in peers
            }
            lens_in = {r: torch.empty(1, dtype=torch.int64, device=self.device) for r in peers}
            self._p2p([(lens_out[r], r) for r in peers], [(lens_in[r], r) for r in peers])
            incoming = {r: _checked_length(int(lens_in[r].item()), max_length, r) for r in peers}
        got: list[torch.Tensor | None] = [None] * world
        for r in peers:
            got[r] = torch.empty(incoming[r], dtype=torch.uint8, device=self.device)  # type: ignore[arg-type]
        self._p2p(
            [(bufs[r], r) for r in peers],  # type: ignore[misc]
            [(got[r], r) for r in peers],  # type: ignore[misc]
        )
        return got

    def sync(self) -> None:
        """A one-byte swap with every rank (recursive doubling): a cheap barrier."""
        flag = torch.zeros(1, dtype=torch.uint8, device=self.device)
        if self.world_size == 1:
            return
        if _is_pow2(self.world_size):
            step = 1
            while step < self.world_size:
                self.exchange(flag, torch.empty_like(flag), self.rank ^ step)
                step *= 2
        else:
            self.all_gather_lengths(0)


class Communicator:
    """The collectives of one TP rank, with the configured codec.

    all_reduce returns the sum over ranks (a new tensor; x is left as is),
    bit-identical on every rank. Counters per codec are in `stats`.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        config: CommConfig,
        pg: object | None = None,
        link: LinkModel | None = None,
        transport: Transport | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.link = link
        self.stats = CommStats()
        self._fixed: CodecSpec | None = None
        self._auto_cache: dict[tuple[int, int], CodecSpec] = {}
        # Set by a micro-chunked step that `auto` sends uncompressed (every rank
        # sets it for the same steps: serve.model.overlap).
        self.exact_only = False
        if config.codec == AUTO:
            if link is None and world_size > 1:
                raise ValueError("comm codec 'auto' needs a LinkModel (LinkModel.probe)")
            if link is not None and link.world_size != world_size:
                raise ValueError(
                    f"link model of {link.world_size} ranks for a group of {world_size}"
                )
        elif config.codec != NONE:
            self._fixed = make_spec(config.codec, config.zstd_level)
        self.transport = transport or Transport(rank, world_size, pg)

    @classmethod
    def start(
        cls,
        rank: int,
        world_size: int,
        config: CommConfig,
        pg: object | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> Communicator:
        """A Communicator for a freshly formed group: with config.shm it maps the
        other ranks' shared memory, with codec auto it probes the links and codecs
        (collective: every rank must call it)."""
        transport: Transport | None = None
        if config.transport == "shm" and world_size > 1:
            from serve.comm.shm import ShmTransport

            transport = ShmTransport.connect(rank, world_size, pg, timeout_s=config.timeout_s)
        elif config.transport == "socket" and world_size > 1:
            from serve.comm.sockets import SocketTransport

            transport = SocketTransport.connect(
                rank, world_size, pg, bind_host=config.bind_host, timeout_s=config.timeout_s
            )
        if transport is None and config.transport != "gloo" and world_size > 1:
            logger.warning(
                "TP rank %d: %s transport unavailable, using gloo", rank, config.transport
            )
        transport = transport or Transport(rank, world_size, pg)
        link = None
        if config.codec == AUTO and world_size > 1:
            from serve.comm.linkmodel import LinkModel

            link = LinkModel.probe(
                transport,
                rank,
                world_size,
                dtype=dtype,
                zstd_level=config.zstd_level,
                two_shot_bytes=config.two_shot_bytes,
                pipeline_chunk_bytes=config.pipeline_chunk_bytes,
            )
            if rank == 0:
                logger.info(
                    "comm auto decisions (policy %s):\n%s",
                    config.accuracy,
                    link.decision_table(default_table_sizes(dtype)),
                )
        return cls(rank, world_size, config, pg, link, transport)

    # -- codec choice ---------------------------------------------------------

    def spec_for(self, x: torch.Tensor) -> CodecSpec | None:
        """The codec this rank uses for x (None: the exact uncompressed path).
        A function of the size and dtype only, so every rank agrees."""
        nbytes = x.numel() * x.element_size()
        if not x.is_floating_point() or self.exact_only:
            return None
        if self.config.codec == AUTO:
            if self.link is None or self.config.accuracy == "exact":
                return None
            key = (nbytes, x.element_size())
            spec = self._auto_cache.get(key)
            if spec is None:
                spec = self.link.choose(nbytes, self.config.accuracy, itemsize=x.element_size())
                self._auto_cache[key] = spec
            return None if spec.name == NONE else spec
        if self._fixed is None or nbytes < self.config.small_message_bytes:
            return None
        return self._fixed

    # -- collectives ----------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks; every rank gets the same bits."""
        if self.world_size == 1 or x.numel() == 0:
            return x
        start = time.perf_counter()
        sent0 = self.transport.bytes_sent
        spec = self.spec_for(x)
        if spec is None:
            out = self._all_reduce_exact(x)
            name = NONE
        else:
            out = self._all_reduce_coded(x, spec)
            name = spec_name(spec)
        self.stats.record(
            name,
            x.numel() * x.element_size(),
            self.transport.bytes_sent - sent0,
            time.perf_counter() - start,
        )
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along dim, uncompressed (exact)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        sent0 = self.transport.bytes_sent
        x = x.contiguous()
        flat = x.reshape(-1).view(torch.uint8)
        n = flat.numel()
        parts = self.transport.all_gather_bytes(flat, [n] * self.world_size)
        tensors = [p.view(x.dtype).reshape(x.shape) for p in parts]
        tensors[self.rank] = x
        out = torch.cat(tensors, dim=dim)
        self.stats.record(
            "all_gather", n, self.transport.bytes_sent - sent0, time.perf_counter() - start
        )
        return out

    def broadcast_tensor(self, x: torch.Tensor | None, src: int = 0) -> torch.Tensor:
        """src's tensor on every rank; the others pass None (shape and dtype
        travel in a small int64 header first)."""
        if self.world_size == 1:
            if x is None:
                raise ValueError("broadcast_tensor on a group of one needs a tensor")
            return x
        device = self.transport.device
        pg = self.transport.pg
        header = torch.zeros(2 + _MAX_NDIM, dtype=torch.int64, device=device)
        if self.rank == src:
            if x is None:
                raise ValueError("the source rank must pass a tensor")
            if x.dim() > _MAX_NDIM or x.dtype not in _DTYPES:
                raise ValueError(f"cannot broadcast a {x.dim()}-d {x.dtype} tensor")
            header[0] = _DTYPES.index(x.dtype)
            header[1] = x.dim()
            header[2 : 2 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
        dist.broadcast(header, group=pg, group_src=src)
        h = header.tolist()
        dtype, shape = _DTYPES[h[0]], tuple(h[2 : 2 + h[1]])
        if self.rank == src:
            data = x.contiguous()  # type: ignore[union-attr]
        else:
            data = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(data, group=pg, group_src=src)
        return data

    # -- exact path -----------------------------------------------------------

    def _all_reduce_exact(self, x: torch.Tensor) -> torch.Tensor:
        world, rank = self.world_size, self.rank
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        if world == 2:
            peer = 1 - rank
            theirs = torch.empty_like(x)
            self.transport.exchange(x, theirs, peer)
            return x + theirs if rank < peer else theirs + x
        if _is_pow2(world) and nbytes < self.config.ring_bytes:
            acc = x
            step = 1
            while step < world:
                peer = rank ^ step
                theirs = torch.empty_like(acc)
                self.transport.exchange(acc, theirs, peer)
                acc = acc + theirs if rank < peer else theirs + acc
                step *= 2
            return acc
        if nbytes >= self.config.ring_bytes:
            # The backend's ring: reduced chunk by chunk on one rank each, then
            # copied, so every rank holds the same bits.
            out = x.clone()
            self.transport.bytes_sent += 2 * (world - 1) * nbytes // world
            dist.all_reduce(out, group=self.transport.pg)
            return out
        flat = x.reshape(-1).view(torch.uint8)
        parts = self.transport.all_gather_bytes(flat, [flat.numel()] * world)
        return tree_sum([p.view(x.dtype).reshape(x.shape) for p in parts])

    # -- compressed path ------------------------------------------------------

    def _all_reduce_coded(self, x: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
        world = self.world_size
        x = x.contiguous()
        nbytes = x.numel() * x.element_size()
        if world == 2 and self.config.pipeline_chunk_bytes and not self.transport.is_nccl:
            sizes = pipeline_split(
                x.numel(), x.element_size(), spec.block_size, self.config.pipeline_chunk_bytes
            )
            if sizes is not None:
                return self._all_reduce_pipelined(x, spec, sizes)
        if world > 2 and nbytes >= self.config.two_shot_bytes:
            sizes = block_split(x.numel(), world, spec.block_size)
            if sizes is not None:
                return self._all_reduce_two_shot(x, spec, sizes)
        bound = max_encoded_nbytes(x.numel(), x.dtype, spec)  # exact without zstd
        payload = encode_to_uint8(x, spec)
        if spec.has_zstd:
            parts = self.transport.all_gather_bytes(payload, max_length=bound)
        else:
            parts = self.transport.all_gather_bytes(payload, [bound] * world)
        return self._sum_decoded(x, parts, spec)

    def _sum_decoded(
        self,
        x: torch.Tensor,
        parts: list[torch.Tensor],
        spec: CodecSpec,
    ) -> torch.Tensor:
        """Decodes every rank's payload and sums in tree order. Exact codecs use
        this rank's own tensor as is; lossy ones decode it like any other."""
        vals = []
        for r, p in enumerate(parts):
            if r == self.rank and spec.is_exact:
                vals.append(x)
            else:
                vals.append(decode_from_uint8(p, x.dtype, x.shape, spec))
        if spec.is_exact:
            return tree_sum(vals)
        return tree_sum([v.float() for v in vals]).to(x.dtype)

    def _all_reduce_pipelined(
        self, x: torch.Tensor, spec: CodecSpec, sizes: list[int]
    ) -> torch.Tensor:
        """Two ranks, gloo: the message in chunks of whole blocks. Every receive
        is posted before encoding starts (gloo moves data only into a posted
        receive), each chunk is sent as soon as it is encoded, and chunks are
        decoded and summed as they land. Same bits as the unsplit exchange.
        zstd chunks travel framed (length word + payload) into receives of
        their largest size, so no length has to be swapped first."""
        rank, peer, pg = self.rank, 1 - self.rank, self.transport.pg
        chunks = list(torch.split(x.reshape(-1), sizes))
        framed = spec.has_zstd
        recv, recv_work = [], []
        for c in chunks:
            cap = max_encoded_nbytes(c.numel(), x.dtype, spec) + (_LENGTH_BYTES if framed else 0)
            buf = torch.empty(cap, dtype=torch.uint8)
            recv.append(buf)
            recv_work.append(dist.irecv(buf, group=pg, group_src=peer, tag=COMM_TAG))
        mine, send_work = [], []
        for c in chunks:
            payload = encode_to_uint8(c, spec)
            mine.append(payload)
            msg = frame(payload) if framed else payload
            send_work.append(dist.isend(msg, group=pg, group_dst=peer, tag=COMM_TAG))
            self.transport.bytes_sent += msg.numel()
        out = torch.empty_like(x).reshape(-1)
        offset = 0
        for k, c in enumerate(chunks):
            recv_work[k].wait()
            theirs = unframe(recv[k]) if framed else recv[k]
            parts = [mine[k], theirs] if rank == 0 else [theirs, mine[k]]
            out[offset : offset + c.numel()] = self._sum_decoded(c, parts, spec)
            offset += c.numel()
        for w in send_work:
            w.wait()
        return out.reshape(x.shape)

    def _all_reduce_two_shot(
        self, x: torch.Tensor, spec: CodecSpec, sizes: list[int]
    ) -> torch.Tensor:
        """Reduce-scatter then all-gather of coded chunks: each rank sends
        2(N-1)/N of the coded bytes instead of (N-1) times them. Chunks are
        whole codec blocks, so every element is coded in the same block as on
        the one-shot path."""
        world, rank = self.world_size, self.rank
        flat = x.reshape(-1)
        chunks = list(torch.split(flat, sizes))
        out_bufs: list[torch.Tensor | None] = [
            None if r == rank else encode_to_uint8(chunks[r], spec) for r in range(world)
        ]
        mine = chunks[rank]
        fixed = not spec.has_zstd
        bound = max_encoded_nbytes(mine.numel(), x.dtype, spec)
        got = self.transport.all_to_all_bytes(out_bufs, bound if fixed else None, max_length=bound)
        vals = [
            mine if r == rank else decode_from_uint8(got[r], x.dtype, mine.shape, spec)  # type: ignore[arg-type]
            for r in range(world)
        ]
        if spec.is_exact:
            reduced = tree_sum(vals)
        else:
            reduced = tree_sum([v.float() for v in vals]).to(x.dtype)
        coded = encode_to_uint8(reduced, spec)
        lengths = [max_encoded_nbytes(c.numel(), x.dtype, spec) for c in chunks] if fixed else None
        bound = max(max_encoded_nbytes(c.numel(), x.dtype, spec) for c in chunks)
        parts = self.transport.all_gather_bytes(coded, lengths, max_length=bound)
        pieces = []
        for r, p in enumerate(parts):
            if r == rank and spec.is_exact:
                pieces.append(reduced)
            else:
                pieces.append(decode_from_uint8(p, x.dtype, chunks[r].shape, spec))
        return torch.cat(pieces).reshape(x.shape)


def block_split(numel: int, parts: int, block: int) -> list[int] | None:
    """Elements of each of `parts` chunks: whole codec blocks, none empty, the
    last the shortest; None when the tensor is too small to split so. Whole
    blocks keep every element in the block it has on the unsplit path, so a
    split message decodes to the same bits."""
    blocks = -(-numel // block)
    per = -(-blocks // parts) * block
    if parts < 1 or (parts - 1) * per >= numel:
        return None
    return [per] * (parts - 1) + [numel - (parts - 1) * per]


def pipeline_split(numel: int, itemsize: int, block: int, chunk_bytes: int) -> list[int] | None:
    """Chunk sizes of a pipelined message: about chunk_bytes each, whole
    blocks, at most MAX_PIPELINE_CHUNKS; None below two chunks."""
    if chunk_bytes <= 0:
        return None
    parts = min(MAX_PIPELINE_CHUNKS, numel * itemsize // chunk_bytes)
    while parts >= 2:
        sizes = block_split(numel, parts, block)
        if sizes is not None:
            return sizes
        parts -= 1
    return None


def spec_name(spec: CodecSpec) -> str:
    """The CommConfig spelling of a spec: "int8", "int8+zstd", "lossless"."""
    return spec.label


def default_table_sizes(dtype: torch.dtype) -> list[int]:
    """Message sizes (bytes) for the start-up decision table: 1 token up to a
    2048-token prefill of a 4096-wide model."""
    item = torch.tensor([], dtype=dtype).element_size()
    return [t * 4096 * item for t in (1, 4, 16, 64, 256, 1024, 2048)]
