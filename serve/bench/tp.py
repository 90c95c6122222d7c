"""`shardwire bench tp`: a TP=2 replica whose ranks sit on two emulated hosts,
per activation codec, beside a TP=1 replica on one host.

For each link (two network namespaces joined by a veth pair shaped with
`tc tbf` to N Mbit/s each way):
1. accuracy and step timings (serve.bench.tp_harness, the real TP path
   in-process on both ranks): greedy-token agreement and mean logit KL of
   every codec against `none` (prompts x generated tokens), wire bytes per
   codec, and the wall time of one prefill step whole and cut into
   micro-chunks whose all-reduces overlap the next chunk's compute;
2. serving, per codec: rank 0, the gateway and the client in namespace A,
   rank 1 in namespace B; TTFT of a long prompt (median of a few distinct
   prompts), inter-token latency of one stream and of a batch of concurrent
   streams (p50/p90).
The TP=1 baseline (rank 0 alone, same threads per rank) runs in namespace A
of the first link. Results are printed as markdown tables with the targets
of the TP work, and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serve.bench.stats import median, names, percentile

if TYPE_CHECKING:
    from clients.client import AsyncClient
    from serve.bench.netns import NetnsPair

logger = logging.getLogger(__name__)

FIXED_CODECS = ("none", "int8", "int4")
SHARD_PORT, GATEWAY_PORT, MASTER_PORT = 50061, 50051, 29531
# Printable ASCII: prompts the presets' tokenizer round-trips.
PRINTABLE = tuple(range(0x20, 0x7F))
SERVE_TIMEOUT_S = 900.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwire bench tp", description=__doc__)
    p.add_argument("--model", default="small", help="preset (or Hugging Face folder)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--rate-mbit", default="100", help="link rates, Mbit/s, comma separated")
    p.add_argument("--codecs", default="none,int8,int4,auto")
    p.add_argument("--comm-accuracy", default="lossy", help="the policy of codec auto")
    p.add_argument("--comm-zstd-level", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (TP=1 too)")
    p.add_argument(
        "--tp-transport",
        default="auto",
        choices=("auto", "socket", "gloo"),
        help="small exchanges of the serving runs' ranks (auto: direct TCP across the link)",
    )
    # Accuracy (harness).
    p.add_argument("--prompts", type=int, default=20, help="accuracy prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="accuracy prompt tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="generated tokens per prompt")
    # Step timings (harness): prefill steps whole vs micro-chunked.
    p.add_argument("--timing-tokens", type=int, default=512, help="0: no step timings")
    p.add_argument("--timing-reps", type=int, default=3)
    p.add_argument("--overlap-chunks", default="1,2", help="micro-chunks per timed step")
    # Serving.
    p.add_argument("--ttft-prompt-len", type=int, default=512)
    p.add_argument("--ttft-reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="concurrent streams of the ITL run")
    p.add_argument("--itl-prompt-len", type=int, default=32)
    p.add_argument("--itl-tokens", type=int, default=64)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-tp1", action="store_true")
    p.add_argument("--out", default="bench-results/tp.json")
    # Internal: the client inside namespace A.
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--target", default="", help=argparse.SUPPRESS)
    p.add_argument("--client-out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the client (inside namespace A) ----------------------------------------------


@dataclass(frozen=True)
class ServeResult:
    ttft_ms: list[float]
    ttft_p50_ms: float
    itl_b1_p50_ms: float
    itl_b1_p90_ms: float
    itl_batch_p50_ms: float
    itl_batch_p90_ms: float
    batch: int
    batch_tokens_per_s: float
    itl_b1_gaps_ms: list[float]


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.choice(PRINTABLE) for _ in range(n)]


async def _stream(
    client: AsyncClient, prompt: list[int], max_tokens: int
) -> tuple[float, list[float]]:
    """(TTFT, gaps): the seconds to the first token, then one gap per later
    token (a chunk of k tokens shares its gap among them)."""
    start = time.perf_counter()
    last = None
    ttft = math.nan
    gaps: list[float] = []
    stream = client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for chunk in stream:
        k = len(chunk.token_ids)
        if not k:
            continue
        now = time.perf_counter()
        if last is None:
            ttft = now - start
            gaps.extend([0.0] * (k - 1))
        else:
            gaps.extend([(now - last) / k] * k)
        last = now
    return ttft, gaps


async def _client(args: argparse.Namespace) -> ServeResult:
    from clients.client import AsyncClient
    from serve.launch import wait_serving

    await wait_serving(args.target, 300)
    rng = random.Random(4321)
    async with AsyncClient(args.target, timeout=SERVE_TIMEOUT_S) as c:
        # Warm-up: a long prefill and a short batch.
        await _stream(c, _prompt(rng, args.ttft_prompt_len), 4)
        await asyncio.gather(*(_stream(c, _prompt(rng, args.itl_prompt_len), 4) for _ in range(2)))
        ttfts = []
        for _ in range(args.ttft_reps):
            await asyncio.sleep(0.2)
            ttft, _ = await _stream(c, _prompt(rng, args.ttft_prompt_len), 1)
            ttfts.append(ttft)
        await asyncio.sleep(0.2)
        _, gaps1 = await _stream(c, _prompt(rng, args.itl_prompt_len), args.itl_tokens)
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        runs = await asyncio.gather(
            *(
                _stream(c, _prompt(rng, args.itl_prompt_len), args.itl_tokens)
                for _ in range(args.batch)
            )
        )
        wall = time.perf_counter() - t0
    gaps = [g for _, gs in runs for g in gs]
    return ServeResult(
        ttft_ms=[t * 1e3 for t in ttfts],
        ttft_p50_ms=median(ttfts) * 1e3,
        itl_b1_p50_ms=percentile(gaps1, 50) * 1e3,
        itl_b1_p90_ms=percentile(gaps1, 90) * 1e3,
        itl_batch_p50_ms=percentile(gaps, 50) * 1e3,
        itl_batch_p90_ms=percentile(gaps, 90) * 1e3,
        batch=args.batch,
        batch_tokens_per_s=args.batch * args.itl_tokens / wall,
        itl_b1_gaps_ms=[round(g * 1e3, 2) for g in gaps1],
    )


def run_client(args: argparse.Namespace) -> int:
    result = asyncio.run(_client(args))
    Path(args.client_out).write_text(json.dumps(asdict(result)))
    return 0


# -- processes in the namespaces --------------------------------------------------


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    """Waits for every process; a failure raises with the tail of its log."""
    deadline = time.monotonic() + timeout_s
    for proc, log in zip(procs, logs, strict=True):
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{log.stem} still running after {timeout_s:.0f} s") from exc
        if rc != 0:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{log.stem} exited with {rc}:\n{tail}")


def _popen(
    pair: NetnsPair, side: int | None, argv: list[str], log: Path, env: dict[str, str]
) -> subprocess.Popen:
    """Starts argv in a namespace (side 0/1) of the pair, or here (None)."""
    out = log.open("w")
    try:
        if side is None:
            return subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return pair.popen(side, argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def run_harness(pair: NetnsPair, args: argparse.Namespace, tmp: Path, port: int) -> dict:
    """Accuracy and step timings with both ranks on the pair's link."""
    out = tmp / "harness.json"
    common = [
        "--world", "2", "--master", f"{pair.addresses[0]}:{port}", "--model", args.model,
        "--dtype", args.dtype, "--codecs", args.codecs, "--accuracy", args.comm_accuracy,
        "--zstd-level", str(args.comm_zstd_level), "--prompts", str(args.prompts),
        "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
        "--timing-tokens", str(args.timing_tokens), "--timing-reps", str(args.timing_reps),
        "--overlap-chunks", args.overlap_chunks, "--threads", str(args.threads),
    ]  # fmt: skip
    procs, logs = [], []
    for rank in range(2):
        argv = [sys.executable, "-m", "serve.bench.tp_harness", "--rank", str(rank), *common]
        if rank == 0:
            argv += ["--out", str(out)]
        logs.append(tmp / f"harness-rank{rank}.log")
        env = _env({"GLOO_SOCKET_IFNAME": pair.devices[rank]})
        procs.append(_popen(pair, rank, argv, logs[-1], env))
    try:
        _wait(procs, logs, SERVE_TIMEOUT_S * 2)
    finally:
        pair.stop_processes()
    return json.loads(out.read_text())


def run_serving(
    pair: NetnsPair, args: argparse.Namespace, tmp: Path, codec: str | None, run: int
) -> dict:
    """One serving run (the run-th on this pair: its ports): TP=2 across the
    pair with codec, or (codec None) TP=1 in namespace A. Returns the
    client's ServeResult as a dict."""
    cli = [sys.executable, "-m", "serve.cli", "--log-level", "warning"]
    tag = codec or "tp1"
    shard_port, gateway_port, port = SHARD_PORT + run, GATEWAY_PORT + run, MASTER_PORT + run
    shard = [
        "--model", args.model, "--dtype", args.dtype, "--num-threads", str(args.threads),
        "--kv-cache-mb", "64", "--no-prefix-caching", "--metrics-port", "-1",
        "--max-num-seqs", str(max(args.batch, 16)),
    ]  # fmt: skip
    procs, logs = [], []

    def start(side: int, argv: list[str], name: str, extra: dict[str, str]) -> None:
        logs.append(tmp / f"{tag}-{name}.log")
        procs.append(_popen(pair, side, argv, logs[-1], _env(extra)))

    if codec is None:
        start(0, [*cli, "shard", "--tp-size", "1", "--port", str(shard_port), *shard], "rank0", {})
    else:
        tp = [
            "--tp-size", "2", "--master-addr", pair.addresses[0], "--master-port", str(port),
            "--comm-codec", codec, "--comm-accuracy", args.comm_accuracy,
            "--comm-zstd-level", str(args.comm_zstd_level), "--tp-transport", args.tp_transport,
        ]  # fmt: skip
        for rank in range(2):
            argv = [*cli, "shard", "--tp-rank", str(rank), *tp, *shard]
            if rank == 0:
                argv += ["--port", str(shard_port)]
            start(rank, argv, f"rank{rank}", {"GLOO_SOCKET_IFNAME": pair.devices[rank]})
    gateway = [
        *cli, "gateway", "--model", args.model, "--port", str(gateway_port),
        "--replica", f"127.0.0.1:{shard_port}", "--metrics-port", "-1",
    ]  # fmt: skip
    start(0, gateway, "gateway", {})
    out = tmp / f"{tag}-client.json"
    client = [
        sys.executable, "-m", "serve.bench.tp", "--client",
        "--target", f"127.0.0.1:{gateway_port}", "--client-out", str(out),
        "--ttft-prompt-len", str(args.ttft_prompt_len), "--ttft-reps", str(args.ttft_reps),
        "--batch", str(args.batch), "--itl-prompt-len", str(args.itl_prompt_len),
        "--itl-tokens", str(args.itl_tokens),
    ]  # fmt: skip
    start(0, client, "client", {})
    try:
        _wait(procs[-1:], logs[-1:], SERVE_TIMEOUT_S)
    except RuntimeError as exc:
        servers = "\n".join(
            f"--- {log.stem}:\n{log.read_text(errors='replace')[-1500:]}"
            for log in logs[:-1]
            if log.exists()
        )
        raise RuntimeError(f"{exc}\n{servers}") from exc
    finally:
        pair.stop_processes()
    return json.loads(out.read_text())


# -- report -----------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def link_table(link: dict, codecs: list[str], tp1: dict | None) -> str:
    rate = link["rate_mbit"]
    serving = link.get("serving", {})
    harness = link.get("harness") or {}
    acc = harness.get("codecs", {})
    none_ttft = serving.get("none", {}).get("ttft_p50_ms", math.nan)
    batch = next(iter(serving.values()), {}).get("batch", "N")
    lines = [
        f"### TP=2 across namespaces, {rate:g} Mbit/s (tbf)",
        "",
        f"| codec | TTFT ms | x none | ITL b1 p50 ms | ITL b{batch} p50 / p90 ms | wire vs bf16 "
        "| top-1 agree | free-run agree | KL mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for codec in codecs:
        s = serving.get(codec, {})
        a = acc.get(codec, {})
        aa = a.get("accuracy", {})
        coded = a.get("coded", {})
        used = [k for k in coded if k != "none"]
        wire = "; ".join(f"{k} {coded[k]['wire_vs_bf16']:.3f}" for k in used) or (
            f"none {coded['none']['wire_vs_bf16']:.2f}" if "none" in coded else "-"
        )
        ttft = s.get("ttft_p50_ms", math.nan)
        lines.append(
            f"| {codec} | {_fmt(ttft, 0)} | {_fmt(_ratio(ttft, none_ttft), 2)} "
            f"| {_fmt(s.get('itl_b1_p50_ms', math.nan))} "
            f"| {_fmt(s.get('itl_batch_p50_ms', math.nan))} / "
            f"{_fmt(s.get('itl_batch_p90_ms', math.nan))} | {wire} "
            f"| {_fmt(aa.get('top1_agreement', math.nan) * 100, 2)}% "
            f"| {_fmt(aa.get('free_run_agreement', math.nan) * 100, 2)}% "
            f"| {aa.get('kl_mean', math.nan):.2e} |"
        )
    if tp1:
        lines.append(
            f"| TP=1, one host | {_fmt(tp1['ttft_p50_ms'], 0)} | "
            f"{_fmt(_ratio(tp1['ttft_p50_ms'], none_ttft), 2)} | "
            f"{_fmt(tp1['itl_b1_p50_ms'])} | {_fmt(tp1['itl_batch_p50_ms'])} / "
            f"{_fmt(tp1['itl_batch_p90_ms'])} | - | - | - | - |"
        )
    timing = [(c, acc[c]["timing"]) for c in codecs if "timing" in acc.get(c, {})]
    if timing:
        chunks = list(timing[0][1]["by_chunks"])
        lines += [
            "",
            f"One prefill step of {timing[0][1]['tokens']} tokens (harness, rank 0 wall time, "
            "median ms); k = micro-chunks whose all-reduces overlap the next chunk's compute:",
            "",
            "| codec | " + " | ".join(f"k={k}" for k in chunks) + " | default policy |",
            "|---|" + "---:|" * len(chunks) + "---|",
        ]
        for codec, t in timing:
            base = t["by_chunks"].get("1", {}).get("median_ms", math.nan)
            cells = []
            for k in chunks:
                v = t["by_chunks"][k]["median_ms"]
                ratio = "" if k == "1" else f" ({_fmt(_ratio(v, base), 2)}x)"
                if k != "1" and t["by_chunks"][k].get("pieces", 1) == 1:
                    ratio += " not cut"
                cells.append(_fmt(v, 0) + ratio)
            policy = "cuts (link-bound)" if t.get("policy_overlaps") else "whole"
            lines.append(f"| {codec} | " + " | ".join(cells) + f" | {policy} |")
    probe = harness.get("link_probe")
    if probe:
        lines += [
            "",
            f"auto's probe: alpha {probe['alpha_us']:.0f} us, beta {probe['beta_mbit_s']:.0f} "
            "Mbit/s",
        ]
    return "\n".join(lines)


def _check(name: str, value: float, limit: float, at_least: bool = False) -> dict:
    """A target: value <= limit (or >= limit when at_least)."""
    if math.isnan(value):
        return {"target": name, "value": None, "limit": limit, "status": "NOT MEASURED"}
    ok = value >= limit if at_least else value <= limit
    return {"target": name, "value": value, "limit": limit, "status": "PASS" if ok else "MISS"}


def targets(report: dict) -> list[dict]:
    """The TP work's targets, each with its measured value and PASS/MISS."""
    links = {link["rate_mbit"]: link for link in report["links"] if "rate_mbit" in link}
    tp1 = report.get("tp1") or {}
    out = []
    first = next(iter(links.values()), {})
    acc = (first.get("harness") or {}).get("codecs", {})
    int4 = acc.get("int4", {}).get("coded", {}).get("int4", {})
    out.append(
        _check("int4 wire bytes / bf16 bytes <= 0.30", int4.get("wire_vs_bf16", math.nan), 0.30)
    )
    at100 = links.get(100.0, {}).get("serving", {})
    none100 = at100.get("none", {}).get("ttft_p50_ms", math.nan)
    for codec, limit in (("int8", 0.6), ("int4", 0.45)):
        v = _ratio(at100.get(codec, {}).get("ttft_p50_ms", math.nan), none100)
        out.append(_check(f"100 Mbit/s: TTFT({codec}) / TTFT(none) <= {limit}", v, limit))
    int8 = acc.get("int8", {}).get("accuracy", {})
    for key, label in (("top1_agreement", "teacher-forced"), ("free_run_agreement", "free-run")):
        v = int8.get(key, math.nan)
        out.append(_check(f"int8 greedy agreement >= 98% ({label})", v, 0.98, at_least=True))
    at1000 = links.get(1000.0, {}).get("serving", {})
    for codec in ("none", "auto"):
        v = _ratio(
            at1000.get(codec, {}).get("itl_b1_p50_ms", math.nan), tp1.get("itl_b1_p50_ms", math.nan)
        )
        out.append(_check(f"1000 Mbit/s: ITL b1 TP=2 ({codec}) / TP=1 <= 1.3", v, 1.3))
    for rate, link in sorted(links.items()):
        serving = link.get("serving", {})
        if "auto" not in serving:
            continue
        for metric in ("ttft_p50_ms", "itl_b1_p50_ms", "itl_batch_p50_ms", "itl_batch_p90_ms"):
            fixed = {c: serving[c][metric] for c in FIXED_CODECS if c in serving}
            if not fixed:
                continue
            best = min(fixed, key=lambda c: fixed[c])
            v = _ratio(serving["auto"][metric], fixed[best])
            out.append(
                _check(f"{rate:g} Mbit/s {metric}: auto / best fixed ({best}) <= 1.10", v, 1.10)
            )
        harness = (link.get("harness") or {}).get("codecs", {})
        if "auto" in harness and "timing" in harness["auto"]:
            step = {c: harness[c]["timing"]["by_chunks"]["1"]["median_ms"] for c in harness
                    if "timing" in harness[c] and c in FIXED_CODECS}  # fmt: skip
            if step:
                best = min(step, key=lambda c: step[c])
                v = _ratio(harness["auto"]["timing"]["by_chunks"]["1"]["median_ms"], step[best])
                out.append(
                    _check(
                        f"{rate:g} Mbit/s prefill step: auto / best fixed ({best}) <= 1.10", v, 1.10
                    )
                )
    return out


def targets_table(checks: list[dict]) -> str:
    lines = ["| target | measured | status |", "|---|---:|---|"]
    for c in checks:
        v = c["value"]
        lines.append(f"| {c['target']} | {'-' if v is None else f'{v:.4f}'} | {c['status']} |")
    return "\n".join(lines)


# -- the driver -------------------------------------------------------------------


def run_link(args: argparse.Namespace, rate: float, codecs: list[str], with_tp1: bool) -> dict:
    from serve.bench.netns import netns_pair

    link: dict = {"rate_mbit": rate, "serving": {}}
    with tempfile.TemporaryDirectory(prefix="sw-bench-tp-") as tmp_name, netns_pair(rate) as pair:
        tmp = Path(tmp_name)
        if not args.skip_accuracy:
            print(f"[{rate:g} Mbit/s] accuracy and step timings", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            link["harness"] = run_harness(pair, args, tmp, MASTER_PORT - 1)
            print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if not args.skip_serving:
            if with_tp1:
                print(f"[{rate:g} Mbit/s] serving TP=1 (one host)", file=sys.stderr, flush=True)
                link["tp1"] = run_serving(pair, args, tmp, None, 0)
            for run, codec in enumerate(codecs, start=1):
                print(f"[{rate:g} Mbit/s] serving TP=2, {codec}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                link["serving"][codec] = r = run_serving(pair, args, tmp, codec, run)
                r["loadavg_after"] = os.getloadavg()[0]
                print(
                    f"  TTFT {r['ttft_p50_ms']:.0f} ms, ITL b1 {r['itl_b1_p50_ms']:.1f} ms, "
                    f"ITL b{r['batch']} {r['itl_batch_p50_ms']:.1f}/{r['itl_batch_p90_ms']:.1f} ms"
                    f" ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return link


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.client:
        return run_client(args)
    import torch

    from serve.bench.netns import NetnsUnavailable

    codecs = names(args.codecs)
    rates = [float(r) for r in names(args.rate_mbit)]
    report: dict = {
        "meta": {
            **{k: v for k, v in vars(args).items() if k not in ("client", "target", "client_out")},
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "argv": list(sys.argv[1:] if argv is None else argv),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # Other work on the host skews timings: the 1-minute load at the start.
            "loadavg_start": os.getloadavg()[0],
        },
        "tp1": None,
        "links": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = []
    for i, rate in enumerate(rates):
        try:
            link = run_link(args, rate, codecs, with_tp1=i == 0 and not args.skip_tp1)
        except NetnsUnavailable as exc:
            print(f"### {rate:g} Mbit/s — skipped: {exc}\n", flush=True)
            report["links"].append({"rate": rate, "skipped": str(exc)})
            continue
        if "tp1" in link:
            report["tp1"] = link.pop("tp1")
        report["links"].append(link)
        tables.append(link_table(link, codecs, report["tp1"]))
        print(tables[-1] + "\n", flush=True)
        out.write_text(json.dumps(report, indent=2))
    report["targets"] = targets(report)
    print(
        f"model={args.model} dtype={args.dtype} threads/rank={args.threads} "
        f"tp-transport={args.tp_transport} "
        f"accuracy: {args.prompts} prompts x {args.max_tokens} tokens; "
        f"TTFT: {args.ttft_prompt_len}-token prompt; ITL: batch 1 and {args.batch}\n"
    )
    print(targets_table(report["targets"]))
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
