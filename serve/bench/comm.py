"""`shardwire bench comm`: all-reduce latency and wire bytes per codec, side by
side with plain `torch.distributed.all_reduce`.

For each link (loopback, or two network namespaces joined by a veth pair shaped
with `tc tbf` to N Mbit/s each way) two rank processes are started; they probe
the link (the `auto` model), then time every method on every message size
(tokens x hidden, bf16, activation-like data with outlier channels): median and
p90 latency, wire bytes per rank, and the error against the exact fp32 sum.
Results are printed as markdown tables and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from serve.bench.stats import names, percentile

logger = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "torch",
    "none",
    "lossless",
    "int8",
    "int8+zstd",
    "fp8",
    "fp8+zstd",
    "int4",
    "int4+zstd",
    "auto",
)
TORCH = "torch"  # plain torch.distributed.all_reduce
NETNS_PORT = 29500


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwire bench comm", description=__doc__)
    p.add_argument("--links", default="loopback,1000,100,10", help="loopback and/or Mbit/s")
    p.add_argument("--tokens", default="1,16,256,2048")
    p.add_argument("--hidden", default="896,4096")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--accuracy", default="lossy", help="policy of the auto method")
    p.add_argument("--zstd-level", type=int, default=1)
    p.add_argument("--world", type=int, default=2, help="ranks (loopback only beyond 2)")
    p.add_argument("--reps", type=int, default=50, help="most timed runs per cell")
    p.add_argument("--min-reps", type=int, default=3, help="fewest (unless one run > budget)")
    p.add_argument("--budget-s", type=float, default=1.5, help="time per cell to aim at")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument(
        "--gap-ms",
        type=float,
        default=-1,
        help="idle time before each timed run, so a shaped link's token bucket refills"
        " (as between layers); -1: 3 ms on shaped links, 0 on loopback",
    )
    p.add_argument("--link-timeout-s", type=float, default=1800)
    p.add_argument("--out", default="bench-results/comm.json")
    # Internal: one rank of one link.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--master", default="127.0.0.1:29500", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# -- one rank -------------------------------------------------------------------


def make_input(rank: int, tokens: int, hidden: int):  # -> torch.Tensor [tokens, hidden] bf16
    """This rank's activation-like contribution: N(0, 1) with 1% outlier
    channels at 20x, different per rank, reproducible by every rank."""
    import torch

    g = torch.Generator().manual_seed(7919 * rank + 31 * tokens + hidden)
    x = torch.randn(tokens, hidden, generator=g)
    outliers = (torch.arange(hidden) * 2654435761) % 100 == 0
    x[:, outliers] *= 20
    return x.to(torch.bfloat16)


@dataclass
class Op:
    """One method's collective on one message."""

    method: str
    run: Callable[[], object]
    prepare: Callable[[], object] | None = None
    times: list[float] = field(default_factory=list)
    out: object = None


def _measure_side_by_side(ops: list[Op], transport, rank: int, args: argparse.Namespace) -> None:
    """Times every op after a barrier, rank 0's clock, interleaved: each round
    runs every method once, starting one further each round, so a noisy
    stretch of the host hits all methods alike. The first round warms up and
    sizes the number of rounds (rank 0 decides and tells the others)."""
    import torch

    def once(op: Op) -> float:
        if op.prepare is not None:
            op.prepare()
        if args.gap_ms > 0:
            time.sleep(args.gap_ms / 1e3)
        transport.sync()
        t0 = time.perf_counter()
        op.out = op.run()
        return time.perf_counter() - t0

    first = [once(op) for op in ops]
    rounds = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        budget = args.budget_s * len(ops)
        fit = int(budget / max(sum(first), 1e-7))
        rounds[0] = 0 if sum(first) > budget else min(args.reps, max(args.min_reps, fit))
    _agree(transport, rounds)
    n = int(rounds.item())
    for r in range(n):
        for i in range(len(ops)):
            op = ops[(i + r) % len(ops)]
            op.times.append(once(op))
    if n == 0:  # one run was over the budget: the warm-up is the sample
        for op, t in zip(ops, first, strict=True):
            op.times.append(t)


def _agree(transport, value) -> None:
    """Rank 0's value on every rank (recursive doubling over the ranks: others
    send zeros, so the sum is rank 0's)."""
    import torch

    if transport.rank != 0:
        value.zero_()
    step = 1
    while step < transport.world_size:
        theirs = torch.empty_like(value)
        transport.exchange(value, theirs, transport.rank ^ step)
        value += theirs
        step *= 2


def run_worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from serve.comm.collectives import CommConfig, Communicator, Transport, tree_sum
    from serve.comm.linkmodel import LinkModel

    torch.set_num_threads(args.threads)
    rank, world = args.rank, args.world
    if world & (world - 1):
        raise SystemExit("bench comm: --world must be a power of two")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.master}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=max(120.0, args.budget_s * 40)),
    )
    try:
        transport = Transport(rank, world)
        model = LinkModel.probe(transport, rank, world, zstd_level=args.zstd_level)
        methods = names(args.methods)
        comms = {
            m: Communicator(
                rank,
                world,
                CommConfig(
                    codec=m,
                    accuracy=args.accuracy,
                    zstd_level=args.zstd_level,
                    small_message_bytes=0,
                ),
                link=model,
            )
            for m in methods
            if m != TORCH
        }
        cells = []
        for hidden in _ints(args.hidden):
            for tokens in _ints(args.tokens):
                x = make_input(rank, tokens, hidden)
                nbytes = x.numel() * x.element_size()
                exact = tree_sum([make_input(r, tokens, hidden).float() for r in range(world)])
                ops = []
                for m in methods:
                    if m == TORCH:
                        buf = torch.empty_like(x)
                        ops.append(
                            Op(
                                m,
                                lambda buf=buf: dist.all_reduce(buf),
                                lambda b=buf, x=x: b.copy_(x),
                            )
                        )
                    else:
                        ops.append(Op(m, lambda comm=comms[m], x=x: comm.all_reduce(x)))
                before = {m: _totals(c) for m, c in comms.items()}
                _measure_side_by_side(ops, transport, rank, args)
                for op in ops:
                    m = op.method
                    if m == TORCH:
                        out = buf
                        codec = "bf16"
                        wire = 2 * (world - 1) / world * nbytes  # ring: the bytes it must send
                    else:
                        comm = comms[m]
                        out = op.out
                        wire1, msgs1 = _totals(comm)
                        wire = (wire1 - before[m][0]) / max(1, msgs1 - before[m][1])
                        spec = comm.spec_for(x)
                        codec = "none" if spec is None else spec.label
                    err = float((out.float() - exact).norm() / exact.norm().clamp(min=1e-30))
                    times = op.times
                    cell = {
                        "hidden": hidden,
                        "tokens": tokens,
                        "bytes": nbytes,
                        "method": m,
                        "codec": codec,
                        "reps": len(times),
                        "p50_us": percentile(times, 50) * 1e6,
                        "p90_us": percentile(times, 90) * 1e6,
                        "min_us": min(times) * 1e6,
                        "wire_bytes": wire,
                        "wire_ratio": wire / nbytes,
                        "rel_err": err,
                    }
                    cells.append(cell)
                    if rank == 0:
                        print(
                            f"  {hidden}x{tokens} {m:<10} p50 {cell['p50_us'] / 1e3:9.3f} ms"
                            f"  p90 {cell['p90_us'] / 1e3:9.3f} ms  wire {wire / 1e3:9.1f} KB"
                            f"  ({len(times)} reps, {codec})",
                            file=sys.stderr,
                            flush=True,
                        )
        if rank == 0:
            result = {
                "probe": {
                    "alpha_us": model.alpha_s * 1e6,
                    "beta_mbit_s": model.beta_bytes_per_s * 8 / 1e6,
                },
                "decision_table": model.decision_table(
                    [t * h * 2 for h in _ints(args.hidden) for t in _ints(args.tokens)]
                ),
                "cells": cells,
            }
            Path(args.result).write_text(json.dumps(result))
        transport.sync()
    finally:
        dist.destroy_process_group()
    return 0


def _totals(comm) -> tuple[int, int]:
    """(wire bytes, messages) of a Communicator's all-reduces so far."""
    counters = comm.stats.by_codec.values()
    return sum(c.wire_bytes for c in counters), sum(c.messages for c in counters)


# -- the driver -----------------------------------------------------------------


def _worker_argv(args: argparse.Namespace, rank: int, master: str, result: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serve.bench.comm",
        "--worker",
        f"--rank={rank}",
        f"--world={args.world}",
        f"--master={master}",
        f"--result={result}",
        f"--tokens={args.tokens}",
        f"--hidden={args.hidden}",
        f"--methods={args.methods}",
        f"--accuracy={args.accuracy}",
        f"--zstd-level={args.zstd_level}",
        f"--reps={args.reps}",
        f"--min-reps={args.min_reps}",
        f"--budget-s={args.budget_s}",
        f"--threads={args.threads}",
        f"--gap-ms={args.gap_ms}",
    ]


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if rc != 0:
            raise RuntimeError(f"bench rank exited with {rc}")


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_link(args: argparse.Namespace, link: str) -> dict:
    """Runs the ranks over one link and returns rank 0's results."""
    from serve.bench.netns import netns_pair
    from serve.launch import free_port

    env_base = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env_base["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env_base.get("PYTHONPATH")]))
    if args.gap_ms < 0:
        args = argparse.Namespace(**{**vars(args), "gap_ms": 0.0 if link == "loopback" else 3.0})
    with tempfile.TemporaryDirectory(prefix="sw-bench-comm-") as tmp:
        result = os.path.join(tmp, "rank0.json")
        if link == "loopback":
            master = f"127.0.0.1:{free_port()}"
            env = {**env_base, "GLOO_SOCKET_IFNAME": "lo"}
            procs = [
                subprocess.Popen(_worker_argv(args, r, master, result), env=env)
                for r in range(args.world)
            ]
            try:
                _wait_all(procs, args.link_timeout_s)
            finally:
                _kill_all(procs)
            rate = None
        else:
            if args.world != 2:
                raise SystemExit("bench comm: namespace links take exactly two ranks")
            rate = float(link)
            with netns_pair(rate) as pair:
                master = f"{pair.addresses[0]}:{NETNS_PORT}"
                procs = [
                    pair.popen(
                        r,
                        _worker_argv(args, r, master, result),
                        env={**env_base, "GLOO_SOCKET_IFNAME": pair.devices[r]},
                    )
                    for r in range(2)
                ]
                _wait_all(procs, args.link_timeout_s)
        data = json.loads(Path(result).read_text())
    data["link"] = link
    data["rate_mbit"] = rate
    data["gap_ms"] = args.gap_ms
    return data


def _link_title(data: dict) -> str:
    name = "loopback" if data["rate_mbit"] is None else f"{data['rate_mbit']:g} Mbit/s (tbf)"
    probe = data["probe"]
    return (
        f"### {name} — probe: alpha {probe['alpha_us']:.0f} us, "
        f"beta {probe['beta_mbit_s']:.0f} Mbit/s; {data.get('gap_ms', 0):g} ms idle before each run"
    )


def _fmt_ms(us: float) -> str:
    return f"{us / 1e3:.3g}"


def markdown_tables(data: dict, methods: list[str]) -> str:
    cells = data["cells"]
    by_key = {(c["hidden"], c["tokens"], c["method"]): c for c in cells}
    sizes = sorted({(c["hidden"], c["tokens"]) for c in cells})
    heads = ["torch all_reduce" if m == TORCH else m for m in methods]
    out = [_link_title(data), "", "Latency per all-reduce, p50 / p90 in ms:", ""]
    out.append("| hidden | tokens | KB | " + " | ".join(heads) + " |")
    out.append("|---:|---:|---:|" + "---|" * len(methods))
    for hidden, tokens in sizes:
        row = [str(hidden), str(tokens), f"{hidden * tokens * 2 / 1e3:.4g}"]
        for m in methods:
            c = by_key.get((hidden, tokens, m))
            if c is None:
                row.append("")
                continue
            text = f"{_fmt_ms(c['p50_us'])} / {_fmt_ms(c['p90_us'])}"
            if m == "auto":
                text += f" ({c['codec']})"
            row.append(text)
        out.append("| " + " | ".join(row) + " |")
    out += [
        "",
        "p50 speed-up vs torch all_reduce · bytes each rank sends / message bytes:",
        "",
    ]
    shown = [m for m in methods if m != TORCH]
    out.append("| hidden | tokens | " + " | ".join(shown) + " |")
    out.append("|---:|---:|" + "---|" * len(shown))
    for hidden, tokens in sizes:
        base = by_key.get((hidden, tokens, TORCH))
        row = [str(hidden), str(tokens)]
        for m in shown:
            c = by_key.get((hidden, tokens, m))
            if c is None:
                row.append("")
                continue
            speed = f"{base['p50_us'] / c['p50_us']:.2f}x" if base else "-"
            row.append(f"{speed} · {c['wire_ratio']:.2f}")
        out.append("| " + " | ".join(row) + " |")
    out += ["", "Relative L2 error vs the exact fp32 sum (worst over sizes):", ""]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "---:|" * len(methods))
    worst = [max((c["rel_err"] for c in cells if c["method"] == m), default=0.0) for m in methods]
    out.append("| " + " | ".join(f"{e:.1e}" for e in worst) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    if args.worker:
        logging.basicConfig(level=logging.WARNING)
        return run_worker(args)
    import torch

    from serve.bench.netns import NetnsUnavailable

    methods = names(args.methods)
    links = names(args.links)
    report = {
        "meta": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "world": args.world,
            "dtype": "bfloat16",
            "threads_per_rank": args.threads,
            "accuracy_of_auto": args.accuracy,
            "zstd_level": args.zstd_level,
            "argv": list(argv or []),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "links": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = []
    for link in links:
        print(f"link {link}: running {args.world} ranks", file=sys.stderr, flush=True)
        try:
            data = run_link(args, link)
        except NetnsUnavailable as exc:
            print(f"### {link} Mbit/s — skipped: {exc}\n", flush=True)
            report["links"].append({"link": link, "skipped": str(exc)})
            continue
        report["links"].append(data)
        tables.append(markdown_tables(data, methods))
        print(tables[-1] + "\n", flush=True)
        out.write_text(json.dumps(report, indent=2))
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
