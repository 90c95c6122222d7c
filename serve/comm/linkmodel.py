"""The link cost model behind `--comm-codec auto`.

Sending an all-reduce message of n raw bytes with codec c between two ranks is
predicted to take

    t(c, n) = enc_c(n) + x(r_c * n) + k * dec_c(n)

where x(w) is the measured time of a pairwise exchange of w bytes (both ranks
sending at once, as the collectives do): alpha + w / beta on an ideal link,
here interpolated through a ladder of probed sizes, because real links are not
ideal (a token bucket lets small messages through at line rate, TCP windows
open slowly). r_c is the codec's wire ratio, enc/dec its measured encode and
decode times (fitted as a + b * numel), k the contributions a rank decodes (2
for lossy codecs, which decode their own copy too; 1 for exact ones). Large two-rank messages
are pipelined in chunks (see Communicator), so encoding, the wire and decoding
overlap: the time tends to the larger of the CPU work and the wire.
Beyond two ranks: recursive doubling rounds, two-shot for large coded messages,
and the better of recursive doubling and the backend's ring when uncompressed.

Every rank holds the same numbers: rank 0 ping-pongs with each other rank when
the group forms, all ranks time the codecs on activation-like data at once (as
they will run), and the numbers are combined into one float64 vector by an
element-wise max over the ranks (the slowest link and the slowest rank), which
every rank computes from the same bytes. So every rank picks the same codec
for the same message.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import torch

from serve.comm.codecs import BLOCK_LABELS, CodecSpec, decode_from_uint8, encode_to_uint8
from serve.comm.collectives import (
    CommConfig,
    Communicator,
    Transport,
    make_spec,
    pipeline_split,
)

logger = logging.getLogger(__name__)

# Candidates of `auto`, cheapest-to-explain first (ties go to the earlier one).
# kmeans4 is left out: it loses to int4 at equal bytes and encodes ~10x slower.
CANDIDATES: tuple[str, ...] = BLOCK_LABELS
POLICY_CODECS: dict[str, frozenset[str] | None] = {
    "exact": frozenset({"none"}),
    "lossless": frozenset({"none", "lossless"}),
    "lossy": None,  # every candidate
}
# A codec is chosen over `none` only when predicted this much faster.
CODEC_MARGIN = 0.05
# Exchange sizes probed on every link (bytes), then one large size picked so
# that it takes about _PROBE_TARGET_S.
PROBE_LADDER: tuple[int, ...] = (8, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_PROBE_ROUNDS = 10
# Up to this size the low quantile of the rounds (latency), above the best
# round (bandwidth: a busy host only ever adds time).
_PROBE_LATENCY_MAX = 8192
_PROBE_GAP_S = 0.002
_PROBE_LARGE_MIN = 256 * 1024
_PROBE_LARGE_MAX = 8 * 1024 * 1024
_PROBE_TARGET_S = 0.02
_NUM_POINTS = len(PROBE_LADDER) + 1
_HEAD = 4  # alpha, beta, add_a, add_b
_FIELDS_PER_CODEC = 5
# Codecs are timed at these element counts: one token of a wide model, and a
# pipeline chunk's worth (large messages are coded chunk by chunk).
_MEASURE_NUMELS = (4096, 256 * 1024)
_DEFAULTS = CommConfig()


@dataclass(frozen=True)
class CodecCost:
    """Measured cost of one codec: seconds = a + b * numel, per tensor."""

    name: str
    enc_a: float = 0.0
    enc_b: float = 0.0
    dec_a: float = 0.0
    dec_b: float = 0.0
    wire_ratio: float = 1.0  # wire bytes / raw bytes at the model's element size

    def encode_s(self, numel: float) -> float:
        return self.enc_a + self.enc_b * numel

    def decode_s(self, numel: float) -> float:
        return self.dec_a + self.dec_b * numel

    @property
    def is_exact(self) -> bool:
        return self.name in ("none", "lossless")

    @property
    def has_zstd(self) -> bool:
        return self.name == "lossless" or self.name.endswith("+zstd")


@cache
def _block_size(name: str) -> int:
    return make_spec(name).block_size  # type: ignore[return-value]


@dataclass(frozen=True)
class LinkModel:
    alpha_s: float  # latency of a pairwise exchange
    beta_bytes_per_s: float  # bandwidth of a pairwise exchange, per direction
    world_size: int = 2
    itemsize: int = 2  # element size the codecs were measured at
    costs: tuple[CodecCost, ...] = field(default_factory=lambda: (CodecCost("none"),))
    add_a: float = 0.0  # local sum of two tensors: seconds = a + b * numel
    add_b: float = 0.0
    zstd_level: int = 1
    two_shot_bytes: int = _DEFAULTS.two_shot_bytes
    pipeline_chunk_bytes: int = _DEFAULTS.pipeline_chunk_bytes
    # Measured pairwise exchanges: (bytes, seconds), ascending. Empty: the
    # ideal alpha + bytes / beta.
    points: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.alpha_s < 0 or self.beta_bytes_per_s <= 0:
            raise ValueError(
                f"bad link numbers: alpha {self.alpha_s}, beta {self.beta_bytes_per_s}"
            )
        if not any(c.name == "none" for c in self.costs):
            object.__setattr__(self, "costs", (CodecCost("none"), *self.costs))
        pts = sorted(self.points)
        # Monotone: a larger exchange never takes less time.
        mono, top = [], 0.0
        for w, t in pts:
            top = max(top, t)
            mono.append((w, top))
        object.__setattr__(self, "points", tuple(mono))

    # -- prediction -----------------------------------------------------------

    def cost(self, name: str) -> CodecCost:
        for c in self.costs:
            if c.name == name:
                return c
        raise KeyError(f"no measured cost for codec {name!r}")

    def exchange_s(self, nbytes: float) -> float:
        """Predicted time of one pairwise exchange of nbytes each way."""
        pts = self.points
        if not pts:
            return self.alpha_s + nbytes / self.beta_bytes_per_s
        if nbytes <= pts[0][0]:
            return pts[0][1]
        for (w0, t0), (w1, t1) in zip(pts, pts[1:], strict=False):
            if nbytes <= w1:
                return t0 + (t1 - t0) * (nbytes - w0) / (w1 - w0) if w1 > w0 else t1
        w_last, t_last = pts[-1]
        return t_last + (nbytes - w_last) / self.beta_bytes_per_s

    def wire_bytes(self, name: str, nbytes: float, itemsize: int | None = None) -> float:
        """Bytes one coded contribution of an n-byte message puts on the wire."""
        itemsize = itemsize or self.itemsize
        c = self.cost(name)
        if c.is_exact:  # scales with the element size
            return nbytes * c.wire_ratio
        return nbytes / itemsize * self.itemsize * c.wire_ratio

    def predict(self, name: str, nbytes: int, itemsize: int | None = None) -> float:
        """Predicted seconds of one all-reduce of nbytes with codec name."""
        itemsize = itemsize or self.itemsize
        p = self.world_size
        if p <= 1:
            return 0.0
        numel = nbytes / itemsize
        c = self.cost(name)
        x = self.exchange_s
        adds = (p - 1) * (self.add_a + self.add_b * numel)
        rounds = max(1, math.ceil(math.log2(p)))
        if name == "none":
            if p == 2:
                return x(nbytes) + adds
            rd = rounds * x(nbytes)
            ring = 2 * (p - 1) * x(nbytes / p)
            return min(rd, ring) + adds
        wire = self.wire_bytes(name, nbytes, itemsize)
        # zstd lengths: two ranks frame them into the payload (gloo), more
        # ranks gather them first (one more latency per round).
        lengths = self.alpha_s if c.has_zstd and p > 2 else 0.0
        decodes = p - 1 if c.is_exact else p
        if p == 2:
            sizes = pipeline_split(
                int(numel), itemsize, _block_size(name), self.pipeline_chunk_bytes
            )
            if sizes is not None:
                k = len(sizes)
                chunk = numel / k
                cpu = k * (c.encode_s(chunk) + decodes * c.decode_s(chunk))
                stream = c.encode_s(chunk) + x(wire) + decodes * c.decode_s(chunk)
                return max(cpu, stream) + lengths + adds
            return c.encode_s(numel) + x(wire) + lengths + decodes * c.decode_s(numel) + adds
        if nbytes >= self.two_shot_bytes:
            chunk = numel / p
            coding = (
                c.encode_s(numel - chunk)
                + c.encode_s(chunk)
                + (p - 1) * c.decode_s(chunk)
                + decodes * c.decode_s(chunk)
            )
            scatter = x((p - 1) * wire / p)
            gather = sum(x(wire / p * 2**k) for k in range(rounds))
            return coding + scatter + gather + 2 * rounds * lengths + adds / p
        gather = sum(x(wire * 2**k) for k in range(rounds))
        return c.encode_s(numel) + gather + rounds * lengths + decodes * c.decode_s(numel) + adds

    def allowed(self, accuracy: str) -> list[str]:
        if accuracy not in POLICY_CODECS:
            raise ValueError(f"accuracy must be one of {tuple(POLICY_CODECS)}, got {accuracy!r}")
        keep = POLICY_CODECS[accuracy]
        return [c.name for c in self.costs if keep is None or c.name in keep]

    def choose_name(self, nbytes: int, accuracy: str, itemsize: int | None = None) -> str:
        """The allowed codec with the least predicted time (ties: the earlier);
        a codec must beat `none` by CODEC_MARGIN, since near break-even the
        exact path is as fast and costs no accuracy."""
        best, best_t = "none", math.inf
        for name in self.allowed(accuracy):
            t = self.predict(name, nbytes, itemsize)
            if t < best_t:
                best, best_t = name, t
        if best != "none" and best_t > (1 - CODEC_MARGIN) * self.predict("none", nbytes, itemsize):
            return "none"
        return best

    def choose(self, nbytes: int, accuracy: str, itemsize: int | None = None) -> CodecSpec:
        name = self.choose_name(nbytes, accuracy, itemsize)
        return CodecSpec("none") if name == "none" else make_spec(name, self.zstd_level)

    def decision_table(self, sizes: Sequence[int], itemsize: int | None = None) -> str:
        """Predicted microseconds per codec and the choice of each policy, as a
        markdown table (message sizes in bytes)."""
        names = [c.name for c in self.costs]
        lines = [
            f"link: alpha {self.alpha_s * 1e6:.0f} us, beta {self.beta_bytes_per_s * 8 / 1e6:.0f}"
            f" Mbit/s, {self.world_size} ranks; predicted us per all-reduce",
            "| bytes | " + " | ".join(names) + " | lossless | lossy |",
            "|---:|" + "---:|" * len(names) + "---|---|",
        ]
        for n in sizes:
            cells = [f"{self.predict(name, n, itemsize) * 1e6:.0f}" for name in names]
            lines.append(
                f"| {n} | "
                + " | ".join(cells)
                + f" | {self.choose_name(n, 'lossless', itemsize)}"
                + f" | {self.choose_name(n, 'lossy', itemsize)} |"
            )
        return "\n".join(lines)

    # -- one set of numbers on every rank -------------------------------------

    def to_tensor(self) -> torch.Tensor:
        """alpha, beta, add_a, add_b, the exchange points, then five numbers per
        codec; the codec names and the rest travel out of band (config)."""
        pts = list(self.points)
        if pts and len(pts) != _NUM_POINTS:
            raise ValueError(f"a link model carries {_NUM_POINTS} exchange points")
        vals = [self.alpha_s, self.beta_bytes_per_s, self.add_a, self.add_b]
        for w, t in pts or [(0.0, 0.0)] * _NUM_POINTS:
            vals += [w, t]
        for c in self.costs:
            vals += [c.enc_a, c.enc_b, c.dec_a, c.dec_b, c.wire_ratio]
        return torch.tensor(vals, dtype=torch.float64)

    @classmethod
    def from_tensor(
        cls,
        t: torch.Tensor,
        names: Sequence[str],
        world_size: int,
        itemsize: int,
        zstd_level: int = 1,
        two_shot_bytes: int = _DEFAULTS.two_shot_bytes,
        pipeline_chunk_bytes: int = _DEFAULTS.pipeline_chunk_bytes,
    ) -> LinkModel:
        v = [float(x) for x in t.cpu().tolist()]
        codec_at = _HEAD + 2 * _NUM_POINTS
        if len(v) != codec_at + _FIELDS_PER_CODEC * len(names):
            raise ValueError(f"link model tensor of {len(v)} numbers for {len(names)} codecs")
        pts = tuple(
            (v[_HEAD + 2 * i], v[_HEAD + 2 * i + 1])
            for i in range(_NUM_POINTS)
            if v[_HEAD + 2 * i] > 0
        )
        costs = tuple(
            CodecCost(
                name, *v[codec_at + _FIELDS_PER_CODEC * i : codec_at + _FIELDS_PER_CODEC * (i + 1)]
            )
            for i, name in enumerate(names)
        )
        return cls(
            v[0],
            v[1],
            world_size,
            itemsize,
            costs,
            v[2],
            v[3],
            zstd_level,
            two_shot_bytes,
            pipeline_chunk_bytes,
            pts,
        )

    # -- probing --------------------------------------------------------------

    @classmethod
    def probe(
        cls,
        comm_or_pg: Communicator | Transport | object | None,
        rank: int,
        world: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        zstd_level: int = 1,
        two_shot_bytes: int = _DEFAULTS.two_shot_bytes,
        pipeline_chunk_bytes: int = _DEFAULTS.pipeline_chunk_bytes,
        candidates: Sequence[str] = CANDIDATES,
        measure_numels: tuple[int, int] = _MEASURE_NUMELS,
    ) -> LinkModel:
        """Measures the links and codecs (collective: every rank calls it) and
        returns the same model on every rank."""
        itemsize = torch.tensor([], dtype=dtype).element_size()
        names = ["none", *[n for n in candidates if n != "none"]]
        if world <= 1:
            return cls(0.0, 1e18, world, itemsize, (CodecCost("none"),))
        if isinstance(comm_or_pg, Communicator):
            transport = comm_or_pg.transport
        elif isinstance(comm_or_pg, Transport):
            transport = comm_or_pg
        else:
            transport = Transport(rank, world, comm_or_pg)
        start = time.perf_counter()
        link = torch.zeros(_HEAD + 2 * _NUM_POINTS, dtype=torch.float64)
        if rank == 0:
            # The slowest link decides: the max of every point over the peers.
            pairs = [_probe_pair(transport, peer, leader=True) for peer in range(1, world)]
            points = [(w, max(p[i][1] for p in pairs)) for i, (w, _) in enumerate(pairs[0])]
            alpha = points[0][1]
            (w0, t0), (w1, t1) = points[-2], points[-1]
            beta = (w1 - w0) / (t1 - t0) if t1 > t0 and w1 > w0 else w1 / max(t1 - alpha, 1e-9)
            link[:_HEAD] = torch.tensor([alpha, beta, 0.0, 0.0], dtype=torch.float64)
            for i, (w, t) in enumerate(points):
                link[_HEAD + 2 * i : _HEAD + 2 * i + 2] = torch.tensor([w, t])
        else:
            _probe_pair(transport, 0, leader=False)
        # Every rank times the codecs at the same moment, as they will run.
        transport.sync()
        costs, add_a, add_b = measure_codecs(
            names, dtype, zstd_level, transport.device, measure_numels
        )
        # This rank's vector: the link numbers (zeros but on rank 0), its own
        # add and codec costs; the max over the ranks merges them.
        mine = cls(1.0, 1.0, world, itemsize, costs, add_a, add_b).to_tensor()
        mine[: _HEAD + 2 * _NUM_POINTS] = link
        mine[2:4] = torch.tensor([add_a, add_b], dtype=torch.float64)
        numbers = _max_over_ranks(transport, mine.to(transport.device))
        model = cls.from_tensor(
            numbers, names, world, itemsize, zstd_level, two_shot_bytes, pipeline_chunk_bytes
        )
        if rank == 0:
            logger.info(
                "link probe: alpha %.0f us, beta %.1f Mbit/s over %d ranks (%.2f s)",
                model.alpha_s * 1e6,
                model.beta_bytes_per_s * 8 / 1e6,
                world,
                time.perf_counter() - start,
            )
        return model


def _max_over_ranks(transport: Transport, vec: torch.Tensor) -> torch.Tensor:
    """Element-wise max of every rank's float64 vector: the same bytes in, the
    same result on every rank."""
    raw = vec.contiguous().view(torch.uint8)
    sent0 = transport.bytes_sent
    parts = transport.all_gather_bytes(raw, [raw.numel()] * transport.world_size)
    transport.bytes_sent = sent0  # start-up traffic, not messages
    return torch.stack([p.view(torch.float64) for p in parts]).amax(dim=0).cpu()


def _timed_exchanges(transport: Transport, nbytes: int, peer: int, reps: int) -> list[float]:
    send = torch.zeros(nbytes, dtype=torch.uint8, device=transport.device)
    recv = torch.empty_like(send)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _exchange_now(transport, send, recv, peer)
        times.append(time.perf_counter() - t0)
    return times


def _exchange_now(transport: Transport, send: torch.Tensor, recv: torch.Tensor, peer: int) -> None:
    """An exchange that has finished when it returns (NCCL's wait only orders
    the stream, so the host waits for the device too)."""
    transport.exchange(send, recv, peer)
    if transport.is_nccl:
        torch.cuda.synchronize(transport.device)


def _probe_pair(transport: Transport, peer: int, leader: bool) -> list[tuple[float, float]]:
    """Exchange times [(bytes, seconds)] of the link to peer at the ladder sizes
    and one large size, as the leader measures them; the peer mirrors every
    exchange. The leader picks the large size and tells the peer."""
    sent0 = transport.bytes_sent
    bufs = {
        size: (
            torch.zeros(size, dtype=torch.uint8, device=transport.device),
            torch.empty(size, dtype=torch.uint8, device=transport.device),
        )
        for size in PROBE_LADDER
    }
    times: dict[int, list[float]] = {size: [] for size in PROBE_LADDER}
    # Round-robin over the sizes, so a noisy stretch of the host hits every
    # size alike and the differences between sizes stay true.
    for rnd in range(_PROBE_ROUNDS + 1):
        for size in PROBE_LADDER:
            if size <= _PROBE_LATENCY_MAX:
                # Latency sizes after a pause, as decode messages come between
                # layers' compute: a token-bucket shaper has refilled by then.
                time.sleep(_PROBE_GAP_S)
            t0 = time.perf_counter()
            _exchange_now(transport, *bufs[size], peer)
            if rnd:  # round 0 warms up
                times[size].append(time.perf_counter() - t0)
    points = [
        (float(size), low_quantile(times[size]) if size <= _PROBE_LATENCY_MAX else min(times[size]))
        for size in PROBE_LADDER
    ]
    alpha, (w_medium, t_medium) = points[0][1], points[-1]
    size = torch.zeros(1, dtype=torch.int64, device=transport.device)
    if leader and t_medium - alpha < _PROBE_TARGET_S / 4:
        rate = w_medium / max(t_medium - alpha, 1e-6)
        size[0] = min(max(int(rate * _PROBE_TARGET_S), _PROBE_LARGE_MIN), _PROBE_LARGE_MAX)
    theirs = torch.empty_like(size)
    transport.exchange(size, theirs, peer)
    large = int(size.item() if leader else theirs.item())
    if large:
        _timed_exchanges(transport, large, peer, 1)
        points.append((float(large), min(_timed_exchanges(transport, large, peer, 3))))
    else:
        # A slow link: the top of the ladder already runs at its bandwidth, so
        # the large point continues the ladder's last slope.
        (w_prev, t_prev) = points[-2]
        per_byte = max(t_medium - t_prev, 0.0) / (w_medium - w_prev)
        points.append((2 * w_medium, t_medium + w_medium * per_byte))
    transport.bytes_sent = sent0  # probes are not traffic
    return points


def activation_like(
    numel: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Heavy-tailed data shaped like hidden states: mostly N(0, 1), with 1% of
    the channels (of a 4096-wide row) carrying 20x outliers."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(numel, generator=g)
    channel = torch.arange(numel) % 4096
    outliers = (channel * 2654435761) % 100 == 0
    x = torch.where(outliers, x * 20, x)
    return x.to(dtype).to(device)


def low_quantile(times: Sequence[float]) -> float:
    """The 20th percentile: the cost itself, without the stalls a shared host
    adds at random (links and codecs are both timed so, and compare fairly)."""
    return sorted(times)[len(times) // 5]


def _fit(n1: int, t1: float, n2: int, t2: float) -> tuple[float, float]:
    b = max(0.0, (t2 - t1) / (n2 - n1))
    return max(0.0, t1 - b * n1), b


def measure_codecs(
    names: Sequence[str],
    dtype: torch.dtype,
    zstd_level: int = 1,
    device: torch.device | str = "cpu",
    numels: tuple[int, int] = _MEASURE_NUMELS,
    rounds: int = 6,
) -> tuple[tuple[CodecCost, ...], float, float]:
    """Times every codec's encode and decode at two sizes on activation-like
    data, round-robin over all of them (a noisy stretch of the host hits every
    one alike), taking each one's low quantile. Returns the costs and the
    fitted cost of a local add (a, b)."""
    n1, n2 = numels
    data = [activation_like(n, dtype, device) for n in numels]
    is_cuda = torch.device(device).type == "cuda"
    tasks: dict[tuple[str, str, int], Callable[[], object]] = {}
    for i, x in enumerate(data):
        tasks[("add", "", i)] = lambda x=x: x + x
    for name in names:
        if name == "none":
            continue
        spec = make_spec(name, zstd_level)
        for i, x in enumerate(data):
            enc, dec = _codec_tasks(spec, x)
            tasks[(name, "enc", i)] = enc
            tasks[(name, "dec", i)] = dec
    times: dict[tuple[str, str, int], list[float]] = {key: [] for key in tasks}
    for rnd in range(rounds + 1):
        for key, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            if is_cuda:
                torch.cuda.synchronize()
            if rnd:  # round 0 warms up
                times[key].append(time.perf_counter() - t0)
    t = {key: low_quantile(v) for key, v in times.items()}
    add_a, add_b = _fit(n1, t[("add", "", 0)], n2, t[("add", "", 1)])
    costs = [CodecCost("none")]
    for name in names:
        if name == "none":
            continue
        enc_a, enc_b = _fit(n1, t[(name, "enc", 0)], n2, t[(name, "enc", 1)])
        dec_a, dec_b = _fit(n1, t[(name, "dec", 0)], n2, t[(name, "dec", 1)])
        spec = make_spec(name, zstd_level)
        ratio = encode_to_uint8(data[1], spec).numel() / (n2 * data[1].element_size())
        costs.append(CodecCost(name, enc_a, enc_b, dec_a, dec_b, ratio))
    return tuple(costs), add_a, add_b


def _codec_tasks(
    spec: CodecSpec, x: torch.Tensor
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(encode, decode) of x as calls to time. Lossy contributions are summed
    in float32, so the cast is part of their decoding."""
    buf = encode_to_uint8(x, spec)

    def enc() -> object:
        return encode_to_uint8(x, spec)

    def dec() -> object:
        y = decode_from_uint8(buf, x.dtype, x.shape, spec)
        return y if spec.is_exact else y.float()

    return enc, dec
