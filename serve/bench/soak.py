"""`shardwire bench soak` (`make soak`): mixed load at a fraction of measured
capacity for a long time, watching for leaks and drift.

It starts `shardwire up` (gateway in the launcher process, replica leaders as its
children), then:
1. calibrates: a closed loop of `--calibration-concurrency` clients runs the mix
   for `--calibration-s` seconds; capacity = finished requests per second;
2. soaks: requests of the mix arrive open-loop (Poisson) at `--load` x capacity
   for `--minutes` (default 30): Chat, Chat sessions (two `append_only` turns,
   then CloseSession), Translate, Generate by text and by token ids, TranslateLive
   streams of two segments, and random client cancels (after the first chunk, or
   at a random moment before it, which aborts the request on the replica);
3. drains: waits for the requests in flight, then for every replica to go idle.

Every `--sample-s` seconds it samples the resident memory (VmRSS) of the gateway
and every replica process, and each leader's `Shard.Status`.

Reported (printed, and written as JSON to `--out`):
- RSS growth of each process: the median of the last three samples of the soak
  against the median of the three samples after the warm-up (the first
  `--warmup-fraction` of the soak, at least one sample interval), so that
  allocator and cache warm-up do not count;
- KV blocks leaked per replica: blocks in use once the replica is idle after the
  soak, minus those in use before it. `kv_blocks_free` counts the free pool, which
  holds the prefix-cached blocks of finished requests (they keep their contents
  until reused), so an idle replica reports every block free;
- outcomes by kind and status; errors are every non-OK outcome except the
  CANCELLED of a call this driver cancelled;
- TTFT (client side) p50/p95 in the first and the last window of the soak, and
  their ratio (drift).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from shardwire.v1 import inference_pb2, inference_pb2_grpc, shard_pb2, shard_pb2_grpc

logger = logging.getLogger(__name__)

KINDS = ("chat", "session", "translate", "generate", "generate_ids", "live")
# Share of each kind in the mix.
MIX = {"chat": 0.25, "session": 0.15, "translate": 0.15, "generate": 0.2, "generate_ids": 0.1,
       "live": 0.15}  # fmt: skip
WORDS = ("the", "weather", "train", "station", "river", "music", "bread", "morning", "evening",
         "city", "window", "question", "answer", "table", "coffee", "market", "garden",
         "mountain", "letter", "story", "friend", "travel", "ticket", "museum")  # fmt: skip
LANGS = ("de", "fr", "es", "it", "nl", "pt")
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class SoakConfig:
    model: str = "tiny"
    minutes: float = 30.0
    # Offered load as a fraction of the calibrated capacity.
    load: float = 0.7
    calibration_s: float = 20.0
    calibration_concurrency: int = 16
    # RSS growth is measured from the end of this fraction of the soak.
    warmup_fraction: float = 0.25
    # TTFT windows compared for drift (clamped to a third of the soak).
    window_s: float = 60.0
    sample_s: float = 5.0
    cancel_fraction: float = 0.1
    max_tokens: int = 24
    replicas: int = 1
    num_threads: int = 1
    kv_cache_mb: int = 64
    seed: int = 0
    out: str = "bench-results/soak.json"
    # Extra arguments for `shardwire up`.
    up_args: tuple[str, ...] = ()


@dataclass
class Outcome:
    kind: str
    start_s: float  # since the soak began
    status: str = "OK"
    ttft_s: float | None = None
    total_s: float = 0.0
    num_tokens: int = 0
    cancelled: bool = False  # by this driver

    @property
    def is_error(self) -> bool:
        return self.status != "OK" and not (self.cancelled and self.status == "CANCELLED")


@dataclass
class Sample:
    t_s: float
    rss_kib: dict[str, int]
    kv_free: dict[str, int]
    kv_total: dict[str, int]
    num_running: dict[str, int]


@dataclass
class Processes:
    """The deployment's processes: the gateway (the launcher) and the replica ranks;
    `secret` is the deployment's cluster secret, which Shard calls carry."""

    gateway_pid: int
    secret: str
    replica_pids: dict[str, int] = field(default_factory=dict)  # name -> pid
    leader_targets: dict[str, str] = field(default_factory=dict)  # name -> host:port


# -- the deployment ----------------------------------------------------------------------


def free_port() -> int:
    from serve.launch import free_port as pick

    return pick()


def start_deployment(cfg: SoakConfig, port: int, secret: str) -> subprocess.Popen:
    from serve.config import CLUSTER_SECRET_ENV

    argv = [
        sys.executable, "-m", "serve.cli", "--log-level", "warning", "up",
        "--model", cfg.model, "--port", str(port), "--replicas", str(cfg.replicas),
        "--num-threads", str(cfg.num_threads), "--kv-cache-mb", str(cfg.kv_cache_mb),
        "--metrics-port", "-1", "--no-restart", *cfg.up_args,
    ]  # fmt: skip
    env = {**os.environ, CLUSTER_SECRET_ENV: secret}
    return subprocess.Popen(argv, start_new_session=True, env=env)


def stop_deployment(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return sorted(out)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def find_processes(launcher_pid: int, secret: str) -> Processes:
    """The launcher (which runs the gateway) and its `shardwire shard` children."""
    procs = Processes(launcher_pid, secret)
    for pid in _children(launcher_pid):
        argv = _cmdline(pid)
        if "shard" not in argv:
            continue
        port = argv[argv.index("--port") + 1]
        rank = argv[argv.index("--tp-rank") + 1] if "--tp-rank" in argv else "0"
        name = f"replica:{port}" + (f"/rank{rank}" if rank != "0" else "")
        procs.replica_pids[name] = pid
        if rank == "0":
            host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
            procs.leader_targets[name] = f"{host}:{port}"
    return procs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def shard_status(target: str, secret: str) -> shard_pb2.StatusResponse:
    from serve.gateway.auth import CLUSTER_SECRET_HEADER

    async with grpc.aio.insecure_channel(target) as channel:
        return await shard_pb2_grpc.ShardStub(channel).Status(
            shard_pb2.StatusRequest(), timeout=5, metadata=((CLUSTER_SECRET_HEADER, secret),)
        )


async def sample(procs: Processes, t_s: float) -> Sample:
    rss = {"gateway": rss_kib(procs.gateway_pid)}
    rss.update({name: rss_kib(pid) for name, pid in procs.replica_pids.items()})
    s = Sample(t_s, rss, {}, {}, {})
    for name, target in procs.leader_targets.items():
        status = await shard_status(target, procs.secret)
        s.kv_free[name] = status.kv_blocks_free
        s.kv_total[name] = status.kv_blocks_total
        s.num_running[name] = status.num_running + status.num_waiting
    return s


async def wait_idle(procs: Processes, timeout_s: float) -> dict[str, shard_pb2.StatusResponse]:
    """Each leader's Status once it runs and queues nothing (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {n: await shard_status(t, procs.secret) for n, t in procs.leader_targets.items()}
        busy = [s for s in statuses.values() if s.num_running or s.num_waiting]
        if not busy or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.2)


# -- the workload -------------------------------------------------------------------------


class Workload:
    """Requests of the mix against one gateway."""

    def __init__(self, stub: inference_pb2_grpc.InferenceStub, cfg: SoakConfig, seed: int):
        self.stub = stub
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()

    def text(self, num_words: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(num_words)).capitalize() + "."

    def sampling(self) -> inference_pb2.SamplingParams:
        return inference_pb2.SamplingParams(
            max_tokens=self.rng.randint(self.cfg.max_tokens // 2, self.cfg.max_tokens),
            temperature=self.rng.choice([0.0, 0.7, 1.0]),
            ignore_eos=self.rng.random() < 0.5,
        )

    def pick(self) -> str:
        return self.rng.choices(list(MIX), weights=list(MIX.values()))[0]

    async def run(self, kind: str) -> Outcome:
        out = Outcome(kind, time.monotonic() - self.t0)
        cancel = self.rng.random() < self.cfg.cancel_fraction
        # A cancel lands after the first chunk, or at a random moment before it.
        cancel_after_s = self.rng.uniform(0.0, 0.2) if self.rng.random() < 0.5 else None
        start = time.perf_counter()
        try:
            if kind == "session":
                await self._session(out, start)
            elif kind == "live":
                await self._live(out, start, cancel, cancel_after_s)
            else:
                call = self._unary_stream(kind)
                await self._consume(call, out, start, cancel, cancel_after_s)
        except grpc.aio.AioRpcError as error:
            out.status = error.code().name
        except Exception as error:  # noqa: BLE001 - counted as an error of the soak
            logger.exception("%s request failed in the driver", kind)
            out.status = f"DRIVER_{type(error).__name__}"
        out.total_s = time.perf_counter() - start
        return out

    def _unary_stream(self, kind: str) -> grpc.aio.UnaryStreamCall:
        sampling = self.sampling()
        if kind == "chat":
            messages = [inference_pb2.ChatMessage(role="user", content=self.text(12))]
            if self.rng.random() < 0.5:
                messages.insert(
                    0, inference_pb2.ChatMessage(role="system", content="Answer briefly.")
                )
            request = inference_pb2.ChatRequest(messages=messages, sampling=sampling)
            return self.stub.Chat(request, timeout=REQUEST_TIMEOUT_S)
        if kind == "translate":
            request = inference_pb2.TranslateRequest(
                text=self.text(10), source_lang="en", target_lang=self.rng.choice(LANGS),
                sampling=sampling,
            )  # fmt: skip
            return self.stub.Translate(request, timeout=REQUEST_TIMEOUT_S)
        if kind == "generate":
            request = inference_pb2.GenerateRequest(prompt=self.text(16), sampling=sampling)
            return self.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        ids = [self.rng.randrange(3, 250) for _ in range(self.rng.randint(8, 64))]
        request = inference_pb2.GenerateRequest(prompt_token_ids=ids, sampling=sampling)
        return self.stub.Generate(request, timeout=REQUEST_TIMEOUT_S)

    async def _consume(
        self,
        call: Any,
        out: Outcome,
        start: float,
        cancel: bool,
        cancel_after_s: float | None,
        tokens_of: Callable[[Any], int] = lambda m: len(m.token_ids),
    ) -> None:
        """Reads a stream; a cancelled one ends with status CANCELLED."""

        def cancel_call() -> None:
            if not call.done():
                out.cancelled = True
                call.cancel()

        timer = None
        if cancel and cancel_after_s is not None:
            timer = asyncio.get_running_loop().call_later(cancel_after_s, cancel_call)
        try:
            async for msg in call:
                n = tokens_of(msg)
                if n and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
                out.num_tokens += n
                if cancel and cancel_after_s is None and out.ttft_s is not None:
                    cancel_call()
                    break
        except asyncio.CancelledError:
            if not out.cancelled:  # the driver itself is being cancelled
                raise
        finally:
            if timer is not None:
                timer.cancel()
        if out.cancelled:
            out.status = "CANCELLED"

    async def _session(self, out: Outcome, start: float) -> None:
        """Two append_only turns of one session, then CloseSession."""
        session_id = ""
        for _ in range(2):
            request = inference_pb2.ChatRequest(
                messages=[inference_pb2.ChatMessage(role="user", content=self.text(10))],
                sampling=self.sampling(),
                session_id=session_id,
                append_only=True,
            )
            async for msg in self.stub.Chat(request, timeout=REQUEST_TIMEOUT_S):
                if msg.token_ids and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
                out.num_tokens += len(msg.token_ids)
                session_id = msg.session_id or session_id
        if session_id:
            await self.stub.CloseSession(
                inference_pb2.CloseSessionRequest(session_id=session_id), timeout=30
            )

    async def _live(
        self, out: Outcome, start: float, cancel: bool, cancel_after_s: float | None
    ) -> None:
        config = inference_pb2.TranslateLiveConfig(
            source_lang="en", target_lang=self.rng.choice(LANGS), sampling=self.sampling()
        )
        segments = [self.text(8), self.text(8)]

        async def requests() -> AsyncIterator[inference_pb2.TranslateLiveRequest]:
            yield inference_pb2.TranslateLiveRequest(config=config)
            for text in segments:
                segment = inference_pb2.TranslateSegment(text=text, final=True)
                yield inference_pb2.TranslateLiveRequest(segment=segment)

        call = self.stub.TranslateLive(requests(), timeout=REQUEST_TIMEOUT_S)
        await self._consume(
            call, out, start, cancel, cancel_after_s, tokens_of=lambda m: len(m.chunk.token_ids)
        )


# -- phases --------------------------------------------------------------------------------


async def calibrate(work: Workload, seconds: float, concurrency: int) -> dict[str, float]:
    """Closed loop: finished (uncancelled) requests per second of the mix."""
    deadline = time.monotonic() + seconds
    done: list[Outcome] = []

    async def client() -> None:
        while time.monotonic() < deadline:
            outcome = await work.run(work.pick())
            done.append(outcome)

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    ok = [o for o in done if o.status == "OK"]
    return {
        "seconds": elapsed,
        "concurrency": concurrency,
        "requests": len(done),
        "ok": len(ok),
        "requests_per_s": len(ok) / elapsed,
        "tokens_per_s": sum(o.num_tokens for o in ok) / elapsed,
    }


async def soak(
    work: Workload,
    rate: float,
    seconds: float,
    on_tick: Callable[[float], Awaitable[None]],
    tick_s: float,
) -> tuple[list[Outcome], int]:
    """Poisson arrivals at `rate` per second for `seconds`, with `on_tick(t)` every
    `tick_s` (and once at the end); returns the outcomes and the arrivals dropped
    because too many were in flight (the driver's own bound)."""
    work.t0 = time.monotonic()
    tasks: set[asyncio.Task[Outcome]] = set()
    outcomes: list[Outcome] = []
    dropped = 0
    max_in_flight = max(64, int(rate * 30))

    def finished(task: asyncio.Task[Outcome]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            outcomes.append(task.result())

    async def ticker() -> None:
        while True:
            await on_tick(time.monotonic() - work.t0)
            await asyncio.sleep(tick_s)

    ticks = asyncio.create_task(ticker())
    try:
        while time.monotonic() - work.t0 < seconds:
            await asyncio.sleep(work.rng.expovariate(rate))
            if len(tasks) >= max_in_flight:
                dropped += 1
                continue
            task = asyncio.create_task(work.run(work.pick()))
            tasks.add(task)
            task.add_done_callback(finished)
    finally:
        ticks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticks
    await on_tick(time.monotonic() - work.t0)
    if tasks:
        await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT_S + 10)
    return outcomes, dropped


# -- report --------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def ttft_window(outcomes: list[Outcome], start: float, end: float) -> dict[str, Any]:
    ttfts = [o.ttft_s for o in outcomes if start <= o.start_s < end and o.ttft_s is not None]
    p50, p95 = _pct(ttfts, 0.5), _pct(ttfts, 0.95)
    return {
        "from_s": start,
        "to_s": end,
        "requests": len(ttfts),
        "p50_ms": None if p50 is None else p50 * 1000,
        "p95_ms": None if p95 is None else p95 * 1000,
    }


def rss_growth(samples: list[Sample], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per process: median RSS of the 3 samples after warm-up vs the last 3."""
    after = [s for s in samples if s.t_s >= warmup_s]
    if len(after) < 2:
        after = samples
    base, last = after[:3], after[-3:]
    out = {}
    for name in samples[0].rss_kib:
        b = statistics.median(s.rss_kib.get(name, 0) for s in base)
        e = statistics.median(s.rss_kib.get(name, 0) for s in last)
        out[name] = {
            "baseline_mib": b / 1024,
            "final_mib": e / 1024,
            "growth_pct": 100.0 * (e - b) / b if b else 0.0,
            "baseline_at_s": base[0].t_s,
            "final_at_s": last[-1].t_s,
        }
    return out


def summarize(
    cfg: SoakConfig,
    calibration: dict[str, float],
    rate: float,
    outcomes: list[Outcome],
    dropped: int,
    samples: list[Sample],
    kv_before: dict[str, int],
    kv_after: dict[str, shard_pb2.StatusResponse],
    seconds: float,
) -> dict[str, Any]:
    warmup_s = max(cfg.warmup_fraction * seconds, cfg.sample_s)
    window = min(cfg.window_s, seconds / 3)
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    for o in outcomes:
        by_kind[o.kind][o.status] += 1
    errors = Counter(o.status for o in outcomes if o.is_error)
    first = ttft_window(outcomes, 0.0, window)
    last = ttft_window(outcomes, seconds - window, seconds)
    drift = None
    if first["p50_ms"] and last["p50_ms"]:
        drift = last["p50_ms"] / first["p50_ms"]
    kv = {}
    for name, status in kv_after.items():
        in_use_after = status.kv_blocks_total - status.kv_blocks_free
        kv[name] = {
            "total": status.kv_blocks_total,
            "in_use_before": kv_before.get(name, 0),
            "in_use_after_idle": in_use_after,
            "leaked": in_use_after - kv_before.get(name, 0),
            "idle": status.num_running == 0 and status.num_waiting == 0,
        }
    return {
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "duration_s": seconds,
        "calibration": calibration,
        "offered_rate_per_s": rate,
        "requests": len(outcomes),
        "completed_ok": sum(o.status == "OK" for o in outcomes),
        "cancelled_by_client": sum(o.cancelled for o in outcomes),
        "dropped_by_driver": dropped,
        "errors": dict(errors),
        "num_errors": sum(errors.values()),
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "rss": rss_growth(samples, warmup_s),
        "warmup_s": warmup_s,
        "kv_blocks": kv,
        "kv_blocks_leaked": sum(v["leaked"] for v in kv.values()),
        "ttft": {"first_window": first, "last_window": last, "drift_p50": drift},
        "samples": [asdict(s) for s in samples],
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"soak: {r['duration_s'] / 60:.1f} min at {r['offered_rate_per_s']:.2f} req/s "
        f"({r['config']['load']:.0%} of {r['calibration']['requests_per_s']:.2f} req/s measured)",
        f"requests {r['requests']}, ok {r['completed_ok']}, cancelled by client "
        f"{r['cancelled_by_client']}, errors {r['num_errors']} {r['errors']}, "
        f"dropped by driver {r['dropped_by_driver']}",
        f"KV blocks leaked: {r['kv_blocks_leaked']}",
        "| process | RSS after warm-up MiB | RSS at end MiB | growth |",
        "|---|---:|---:|---:|",
    ]
    for name, g in r["rss"].items():
        lines.append(
            f"| {name} | {g['baseline_mib']:.1f} | {g['final_mib']:.1f} | {g['growth_pct']:+.1f}% |"
        )
    t = r["ttft"]
    first, last = t["first_window"], t["last_window"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    drift = "-" if t["drift_p50"] is None else f"{t['drift_p50']:.2f}x"
    lines.append(
        f"TTFT p50/p95 ms: first window {ms(first['p50_ms'])}/{ms(first['p95_ms'])}, "
        f"last window {ms(last['p50_ms'])}/{ms(last['p95_ms'])}, drift {drift}"
    )
    return "\n".join(lines)


async def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """The whole soak against a fresh deployment; returns the report."""
    from serve.launch import wait_serving

    port = free_port()
    secret = secrets.token_urlsafe(32)
    proc = start_deployment(cfg, port, secret)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, 180, proc)
        procs = find_processes(proc.pid, secret)
        if not procs.leader_targets:
            raise RuntimeError("no replica process found under the launcher")
        async with grpc.aio.insecure_channel(target) as channel:
            work = Workload(inference_pb2_grpc.InferenceStub(channel), cfg, cfg.seed)
            calibration = await calibrate(work, cfg.calibration_s, cfg.calibration_concurrency)
            rate = max(cfg.load * calibration["requests_per_s"], 0.1)
            logger.info("capacity %.2f req/s; soaking at %.2f req/s", calibration["requests_per_s"],
                        rate)  # fmt: skip
            before = await wait_idle(procs, 60)
            kv_before = {n: s.kv_blocks_total - s.kv_blocks_free for n, s in before.items()}
            samples: list[Sample] = []

            async def tick(t_s: float) -> None:
                samples.append(await sample(procs, t_s))

            seconds = cfg.minutes * 60
            outcomes, dropped = await soak(work, rate, seconds, tick, cfg.sample_s)
        after = await wait_idle(procs, 60)
        return summarize(cfg, calibration, rate, outcomes, dropped, samples, kv_before, after,
                         seconds)  # fmt: skip
    finally:
        stop_deployment(proc)


def parse_args(argv: list[str]) -> SoakConfig:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="shardwire bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default=d.model)
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--load", type=float, default=d.load, help="fraction of measured capacity")
    p.add_argument("--calibration-s", type=float, default=d.calibration_s)
    p.add_argument("--calibration-concurrency", type=int, default=d.calibration_concurrency)
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--window-s", type=float, default=d.window_s)
    p.add_argument("--sample-s", type=float, default=d.sample_s)
    p.add_argument("--cancel-fraction", type=float, default=d.cancel_fraction)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--num-threads", type=int, default=d.num_threads)
    p.add_argument("--kv-cache-mb", type=int, default=d.kv_cache_mb)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    p.add_argument("up_args", nargs="*", help="after --: extra `shardwire up` arguments")
    a = p.parse_args(argv)
    return SoakConfig(
        model=a.model, minutes=a.minutes, load=a.load, calibration_s=a.calibration_s,
        calibration_concurrency=a.calibration_concurrency, warmup_fraction=a.warmup_fraction,
        window_s=a.window_s, sample_s=a.sample_s, cancel_fraction=a.cancel_fraction,
        max_tokens=a.max_tokens, replicas=a.replicas, num_threads=a.num_threads,
        kv_cache_mb=a.kv_cache_mb, seed=a.seed, out=a.out, up_args=tuple(a.up_args),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    report = asyncio.run(run_soak(cfg))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
