"""`shardwire bench kv`: moving KV between two replicas, per codec and link.

Two replica processes (`shardwire shard`, the `small` preset by default) and a
gateway in front of them. Per link (loopback, or two network namespaces joined
by a veth pair shaped with `tc tbf` to N Mbit/s each way; source replica, gateway
and client in namespace A, target replica in namespace B):

1. KV moves: the source prefills a context of 1k and 4k tokens (its prefix
   cache keeps the KV), then `Shard.MoveKv` pushes that KV into the target's
   `ImportKv` with each codec, pipelined (chunk k+1 encoded while chunk k is on
   the wire and chunk k-1 decoded) and sequential (encode all, send all, decode
   all, which also times each stage apart). Bytes on the wire against fp16,
   times, and pipelined time over the slowest stage.
2. Migration pause: a greedy stream through the gateway is moved by
   `Admin.Migrate` part way; the client's gap between the last token from the
   source and the first from the target, against the stream's median
   inter-token latency.
3. Agreement (first link only): greedy 128-token streams moved at output token
   40 with each codec, against the same streams unmoved: exact codecs must
   agree on every token, lossy ones report how many agree.

Prints markdown tables and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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

from serve.bench.stats import median, names

if TYPE_CHECKING:
    from serve.bench.netns import NetnsPair

logger = logging.getLogger(__name__)

CODECS = "none,lossless,int8,int8+zstd,int4,int4+zstd"
SOURCE_PORT, TARGET_PORT, GATEWAY_PORT = 50161, 50162, 50151
PRINTABLE = tuple(range(0x20, 0x7F))
TIMEOUT_S = 1800.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwire bench kv", description=__doc__)
    p.add_argument("--model", default="small", help="preset (or Hugging Face folder)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--links", default="loopback,1000,100", help="loopback and/or Mbit/s rates")
    p.add_argument("--contexts", default="1024,4080", help="context tokens (full KV blocks)")
    p.add_argument("--codecs", default=CODECS)
    p.add_argument("--reps", type=int, default=2, help="moves per cell (the fastest is kept)")
    p.add_argument("--pause-codecs", default="lossless,int4+zstd")
    p.add_argument("--pause-reps", type=int, default=3)
    p.add_argument("--pause-prompt", type=int, default=1024, help="prompt tokens of the stream")
    p.add_argument("--pause-at", type=int, default=24, help="tokens before the move starts")
    p.add_argument(
        "--pause-tokens",
        type=int,
        default=160,
        help="tokens of the stream (it must outlast the pre-copy on the slowest link)",
    )
    p.add_argument("--agreement-codecs", default="none,lossless,int8,int8+zstd,int4,int4+zstd")
    p.add_argument("--agreement-prompts", type=int, default=3)
    p.add_argument("--agreement-tokens", type=int, default=128)
    p.add_argument("--agreement-at", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--out", default="bench-results/kv.json")
    p.add_argument("--logs", default="", help="keep the processes' logs in this folder")
    # Internal: the client, next to the source replica.
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", default="", help=argparse.SUPPRESS)
    p.add_argument("--target", default="", help=argparse.SUPPRESS)
    p.add_argument("--gateway", default="", help=argparse.SUPPRESS)
    p.add_argument("--client-out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the client (next to the source) -------------------------------------------------


@dataclass(frozen=True)
class MoveRow:
    context: int
    codec: str
    mode: str  # pipelined | sequential
    raw_bytes: int
    wire_bytes: int
    fp16_ratio: float
    total_ms: float
    encode_ms: float
    receive_ms: float
    decode_ms: float
    source_cpu_ms: float  # CPU time of the replicas' processes during the move
    target_cpu_ms: float


@dataclass(frozen=True)
class AgreementRow:
    codec: str
    prompts: int
    tokens_after_move: int
    agreeing: int
    exact_streams: int  # streams identical to their unmoved run
    moved_at: list[int]


@dataclass(frozen=True)
class PauseRow:
    codec: str
    pause_ms: float
    itl_ms: float
    ratio: float
    at_token: int
    wire_bytes: int


async def _prefill(stub: object, prompt: list[int]) -> float:
    from shardwire.v1 import inference_pb2, shard_pb2

    request = shard_pb2.ShardGenerateRequest(
        request_id=f"fill-{len(prompt)}-{time.monotonic_ns()}",
        prompt_token_ids=prompt,
        sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0.0),
    )
    start = time.perf_counter()
    async for _ in stub.Generate(request, timeout=TIMEOUT_S):  # type: ignore[attr-defined]
        pass
    return time.perf_counter() - start


async def _moves(args: argparse.Namespace) -> tuple[list[MoveRow], dict[int, float]]:
    import grpc
    from shardwire.v1 import shard_pb2, shard_pb2_grpc

    rows: list[MoveRow] = []
    prefill_s: dict[int, float] = {}
    rng = random.Random(99)
    async with grpc.aio.insecure_channel(args.source) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        status = await stub.Status(shard_pb2.StatusRequest(), timeout=30)
        bs = status.block_size
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[status.kv_geometry.dtype]
        for context in [int(c) for c in names(args.contexts)]:
            context = context // bs * bs
            prompt = [rng.choice(PRINTABLE) for _ in range(context + 1)]
            prefill_s[context] = await _prefill(stub, prompt)
            prefix = prompt[:context]
            n = 0
            for codec in names(args.codecs):
                for mode in ("pipelined", "sequential"):
                    best: shard_pb2.MoveKvResponse | None = None
                    for _ in range(args.reps + (1 if n == 0 else 0)):  # one warm-up move
                        n += 1
                        request = shard_pb2.MoveKvRequest(
                            request_id=f"bench-{context}-{n}",
                            target=args.target,
                            codec=codec,
                            prefix_token_ids=prefix,
                            sequential=mode == "sequential",
                        )
                        r = await stub.MoveKv(request, timeout=TIMEOUT_S)
                        if r.num_tokens != context:
                            raise RuntimeError(f"moved {r.num_tokens} tokens, not {context}")
                        if best is None or r.total_s < best.total_s:
                            best = r
                        await asyncio.sleep(0.2)
                    assert best is not None
                    fp16 = best.raw_bytes / itemsize * 2
                    rows.append(
                        MoveRow(
                            context=context,
                            codec=codec,
                            mode=mode,
                            raw_bytes=best.raw_bytes,
                            wire_bytes=best.wire_bytes,
                            fp16_ratio=best.wire_bytes / fp16,
                            total_ms=best.total_s * 1e3,
                            encode_ms=best.encode_s * 1e3,
                            receive_ms=best.receive_s * 1e3,
                            decode_ms=best.decode_s * 1e3,
                            source_cpu_ms=best.source_cpu_s * 1e3,
                            target_cpu_ms=best.target_cpu_s * 1e3,
                        )
                    )
                    print(f"  {context} tokens {codec:10s} {mode:10s} {rows[-1].total_ms:8.1f} ms "
                          f"{best.wire_bytes / 1e6:7.2f} MB", flush=True)  # fmt: skip
    return rows, prefill_s


async def _pauses(args: argparse.Namespace) -> list[PauseRow]:
    import grpc
    from shardwire.v1 import inference_pb2, inference_pb2_grpc, shard_pb2, shard_pb2_grpc

    rows: list[PauseRow] = []
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(args.gateway) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        admin = shard_pb2_grpc.AdminStub(channel)
        for codec in names(args.pause_codecs):
            for _ in range(args.pause_reps):
                prompt = [rng.choice(PRINTABLE) for _ in range(args.pause_prompt)]
                request = inference_pb2.GenerateRequest(
                    prompt_token_ids=prompt,
                    sampling=inference_pb2.SamplingParams(
                        max_tokens=args.pause_tokens, temperature=0.0, ignore_eos=True
                    ),
                )
                times: list[float] = []
                migrate: asyncio.Future | None = None
                async for chunk in inference.Generate(request, timeout=TIMEOUT_S):
                    now = time.perf_counter()
                    times.extend([now] * len(chunk.token_ids))
                    if migrate is None and len(times) >= args.pause_at:
                        rid = chunk.request_id
                        migrate = asyncio.ensure_future(
                            admin.Migrate(
                                shard_pb2.MigrateRequest(request_id=rid, kv_codec=codec),
                                timeout=TIMEOUT_S,
                            )
                        )
                moved = await migrate if migrate is not None else None
                if moved is None or not moved.target:
                    print(f"  pause {codec}: the stream finished before it moved", flush=True)
                    continue
                k = moved.num_output_tokens  # tokens from the source
                gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
                pause = gaps[k - 1]
                others = gaps[2 : k - 1] + gaps[k + 1 :]
                itl = median(others)
                rows.append(PauseRow(codec, pause * 1e3, itl * 1e3, pause / itl, k,
                                     moved.wire_bytes))  # fmt: skip
                print(f"  pause {codec:10s} {pause * 1e3:6.1f} ms vs ITL {itl * 1e3:5.1f} ms "
                      f"(moved at token {k})", flush=True)  # fmt: skip
                await asyncio.sleep(0.3)
    return rows


async def _stream_tokens(
    inference: object, admin: object, prompt: list[int], args: argparse.Namespace, codec: str
) -> tuple[list[int], int]:
    """A greedy stream's tokens; with a codec it is moved at agreement_at on the way."""
    from shardwire.v1 import inference_pb2, shard_pb2

    request = inference_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=inference_pb2.SamplingParams(
            max_tokens=args.agreement_tokens, temperature=0.0, ignore_eos=True
        ),
    )
    tokens: list[int] = []
    migrate: asyncio.Future | None = None
    async for chunk in inference.Generate(request, timeout=TIMEOUT_S):  # type: ignore[attr-defined]
        tokens.extend(chunk.token_ids)
        if codec and migrate is None:
            migrate = asyncio.ensure_future(
                admin.Migrate(  # type: ignore[attr-defined]
                    shard_pb2.MigrateRequest(
                        request_id=chunk.request_id,
                        kv_codec=codec,
                        at_output_token=args.agreement_at,
                    ),
                    timeout=TIMEOUT_S,
                )
            )
    at = 0
    if migrate is not None:
        moved = await migrate
        at = moved.num_output_tokens if moved.target else -1  # -1: finished first
    return tokens, at


async def _agreement(args: argparse.Namespace) -> list[AgreementRow]:
    import grpc
    from shardwire.v1 import inference_pb2_grpc, shard_pb2_grpc

    rng = random.Random(5)
    prompts = [
        [rng.choice(PRINTABLE) for _ in range(rng.randint(24, 96))]
        for _ in range(args.agreement_prompts)
    ]
    rows: list[AgreementRow] = []
    async with grpc.aio.insecure_channel(args.gateway) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        admin = shard_pb2_grpc.AdminStub(channel)
        references = [(await _stream_tokens(inference, admin, p, args, ""))[0] for p in prompts]
        for codec in names(args.agreement_codecs):
            agreeing = exact = 0
            ats: list[int] = []
            for prompt, reference in zip(prompts, references, strict=True):
                tokens, at = await _stream_tokens(inference, admin, prompt, args, codec)
                if at < 0:
                    print(f"  agreement {codec}: a stream finished before it moved", flush=True)
                    continue
                ats.append(at)
                agreeing += sum(a == b for a, b in zip(tokens[at:], reference[at:], strict=True))
                exact += tokens == reference
            after = len(ats) * args.agreement_tokens - sum(ats)
            rows.append(AgreementRow(codec, len(ats), after, agreeing, exact, ats))
            print(f"  agreement {codec:10s} {agreeing}/{after} tokens after the move, "
                  f"{exact}/{len(ats)} streams identical", flush=True)  # fmt: skip
    return rows


async def _client(args: argparse.Namespace) -> dict:
    from serve.launch import wait_serving

    for address in (args.source, args.target, args.gateway):
        await wait_serving(address, 600)
    moves, prefill_s = await _moves(args)
    pauses = await _pauses(args) if args.pause_reps > 0 else []
    agreement = await _agreement(args) if names(args.agreement_codecs) else []
    return {
        "moves": [asdict(r) for r in moves],
        "pauses": [asdict(r) for r in pauses],
        "agreement": [asdict(r) for r in agreement],
        "prefill_s": {str(k): v for k, v in prefill_s.items()},
    }


def run_client(args: argparse.Namespace) -> int:
    result = asyncio.run(_client(args))
    Path(args.client_out).write_text(json.dumps(result))
    return 0


# -- processes ----------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def run_link(args: argparse.Namespace, link: str, tmp: Path, run: int) -> dict:
    """Source, target, gateway and client on one link; returns the client's results."""
    from serve.bench.netns import netns_pair

    cli = [sys.executable, "-m", "serve.cli", "--log-level", "info"]
    ports = [p + 10 * run for p in (SOURCE_PORT, TARGET_PORT, GATEWAY_PORT)]
    replica = [
        "shard", "--model", args.model, "--dtype", args.dtype,
        "--num-threads", str(args.threads), "--kv-cache-mb", "512", "--metrics-port", "-1",
    ]  # fmt: skip
    rate = None if link == "loopback" else float(link)
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(pair: NetnsPair | None, side: int, argv: list[str], name: str) -> None:
        log = tmp / f"{link}-{name}.log"
        logs.append(log)
        with log.open("w") as out:
            kwargs = {"env": _env(), "stdout": out, "stderr": subprocess.STDOUT}
            if pair is None:
                procs.append(subprocess.Popen(argv, start_new_session=True, **kwargs))
            else:
                procs.append(pair.popen(side, argv, **kwargs))

    def go(pair: NetnsPair | None) -> dict:
        target_host = "127.0.0.1" if pair is None else pair.addresses[1]
        source = f"127.0.0.1:{ports[0]}"
        target = f"{target_host}:{ports[1]}"
        gateway = f"127.0.0.1:{ports[2]}"
        start(pair, 0, [*cli, *replica, "--port", str(ports[0])], "source")
        start(pair, 1, [*cli, *replica, "--host", target_host, "--port", str(ports[1])], "target")
        # Load-only routing: every stream starts on the source (the first of two idle
        # replicas), whatever ran before with the same prompt.
        gateway_argv = [*cli, "gateway", "--model", args.model, "--port", str(ports[2]),
                        "--replica", f"{source},{target}", "--metrics-port", "-1",
                        "--no-prefix-affinity"]  # fmt: skip
        start(pair, 0, gateway_argv, "gateway")
        out = tmp / f"{link}-client.json"
        client = [
            sys.executable, "-m", "serve.bench.kv", "--client", "--source", source,
            "--target", target, "--gateway", gateway, "--client-out", str(out),
            "--contexts", args.contexts, "--codecs", args.codecs, "--reps", str(args.reps),
            "--pause-codecs", args.pause_codecs, "--pause-reps", str(args.pause_reps),
            "--pause-prompt", str(args.pause_prompt), "--pause-at", str(args.pause_at),
            "--pause-tokens", str(args.pause_tokens),
            "--agreement-codecs", args.agreement_codecs if run == 0 else "",
            "--agreement-prompts", str(args.agreement_prompts),
            "--agreement-tokens", str(args.agreement_tokens),
            "--agreement-at", str(args.agreement_at),
        ]  # fmt: skip
        argv = client if pair is None else pair.exec_argv(0, client)
        rc = subprocess.run(argv, env=_env(), timeout=TIMEOUT_S, check=False).returncode
        if rc != 0:
            tails = "\n".join(
                f"--- {log.stem}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs
            )
            raise RuntimeError(f"the {link} client exited with {rc}\n{tails}")
        return json.loads(out.read_text())

    try:
        if rate is None:
            return go(None)
        with netns_pair(rate_mbit=rate) as pair:
            try:
                return go(pair)
            finally:
                pair.stop_processes()
    finally:
        for proc in procs:
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, 9)
                proc.wait()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


# -- report -------------------------------------------------------------------------


def _link_name(link: str) -> str:
    return "loopback" if link == "loopback" else f"{link} Mbit/s"


def slowest_ms(s: dict) -> float:
    """The slowest stage of a sequential move, each stage timed alone."""
    return max(s["encode_ms"], s["receive_ms"], s["decode_ms"])


def cpu_floor_ms(p: dict, s: dict, cores: int | None = None) -> float:
    """The least the pipelined move p could take on this machine: the slowest stage
    of its sequential twin s, or the CPU time both replicas' processes spent on p
    (encoding, decoding, gRPC and the kernel's copies on both ends) spread over
    every core, when that is longer: both replicas share this machine's cores."""
    cores = cores or os.cpu_count() or 1
    return max(slowest_ms(s), (p["source_cpu_ms"] + p["target_cpu_ms"]) / cores)


def report(results: dict[str, dict]) -> str:
    lines: list[str] = []
    first = next(iter(results.values()))
    contexts = sorted({r["context"] for r in first["moves"]})
    codecs = list(dict.fromkeys(r["codec"] for r in first["moves"]))
    big = contexts[-1]
    lines += [
        f"Wire bytes per codec ({big}-token context, all layers, keys and values):",
        "",
        "| codec | MB | vs fp16 |",
        "|---|---:|---:|",
    ]
    for codec in codecs:
        row = next(
            r for r in first["moves"]
            if r["context"] == big and r["codec"] == codec and r["mode"] == "pipelined"
        )  # fmt: skip
        lines.append(f"| {codec} | {row['wire_bytes'] / 1e6:.2f} | {row['fp16_ratio']:.3f} |")
    lines += [
        "",
        "Time to move the KV, ms: pipelined / sequential, and pipelined over the slowest "
        "stage (encode, wire, decode, timed apart in the sequential run); the cores the "
        "pipelined move kept busy (CPU time of both replicas over its time), and pipelined "
        f"over its CPU floor (the slowest stage, or that CPU time over {os.cpu_count()} "
        "cores when longer):",
        "",
        "| link | context | codec | pipelined | sequential | encode | wire | decode "
        "| pipelined / slowest | cores busy | pipelined / CPU floor |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for link, res in results.items():
        for context in contexts:
            for codec in codecs:
                cells = {
                    r["mode"]: r
                    for r in res["moves"]
                    if r["context"] == context and r["codec"] == codec
                }
                p, s = cells["pipelined"], cells["sequential"]
                busy = (p["source_cpu_ms"] + p["target_cpu_ms"]) / p["total_ms"]
                lines.append(
                    f"| {_link_name(link)} | {context} | {codec} | {p['total_ms']:.0f} | "
                    f"{s['total_ms']:.0f} | {s['encode_ms']:.0f} | {s['receive_ms']:.0f} | "
                    f"{s['decode_ms']:.0f} | {p['total_ms'] / slowest_ms(s):.2f} | "
                    f"{busy:.2f} | {p['total_ms'] / cpu_floor_ms(p, s):.2f} |"
                )
    agreement = [r for res in results.values() for r in res.get("agreement", [])]
    if agreement:
        lines += [
            "",
            "Greedy agreement of streams moved at output token "
            f"{agreement[0]['moved_at'][0]} against the same streams unmoved "
            f"({agreement[0]['prompts']} prompts):",
            "",
            "| codec | tokens after the move that agree | streams identical |",
            "|---|---:|---:|",
        ]
        for r in agreement:
            share = r["agreeing"] / max(r["tokens_after_move"], 1)
            lines.append(
                f"| {r['codec']} | {r['agreeing']}/{r['tokens_after_move']} ({share:.1%}) | "
                f"{r['exact_streams']}/{r['prompts']} |"
            )
    if any(res["pauses"] for res in results.values()):
        lines += [
            "",
            "Migration pause (client side: last token from the source to the first from "
            "the target) against the stream's inter-token latency, medians:",
            "",
            "| link | codec | pause ms | ITL ms | pause / ITL |",
            "|---|---|---:|---:|---:|",
        ]
        for link, res in results.items():
            for codec in dict.fromkeys(r["codec"] for r in res["pauses"]):
                rows = [r for r in res["pauses"] if r["codec"] == codec]
                pause = median([r["pause_ms"] for r in rows])
                itl = median([r["itl_ms"] for r in rows])
                ratio = median([r["ratio"] for r in rows])
                lines.append(
                    f"| {_link_name(link)} | {codec} | {pause:.1f} | {itl:.1f} | {ratio:.2f} |"
                )
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> list[str]:
    out = []
    moves = [r for res in results.values() for r in res["moves"]]
    int4z = [r["fp16_ratio"] for r in moves if r["codec"] == "int4+zstd"]
    if int4z:
        worst = max(int4z)
        out.append(f"int4+zstd bytes vs fp16: {worst:.3f} (target <= 0.30): "
                   f"{'met' if worst <= 0.30 else 'missed'}")  # fmt: skip
    ratios, bound_ratios, over = [], [], []
    for res in results.values():
        for p in (r for r in res["moves"] if r["mode"] == "pipelined"):
            s = next(
                r for r in res["moves"]
                if r["mode"] == "sequential" and r["context"] == p["context"]
                and r["codec"] == p["codec"]
            )  # fmt: skip
            ratios.append(p["total_ms"] / slowest_ms(s))
            bound_ratios.append(p["total_ms"] / cpu_floor_ms(p, s))
            if ratios[-1] > 1.2:
                busy = (p["source_cpu_ms"] + p["target_cpu_ms"]) / p["total_ms"]
                over.append((busy, bound_ratios[-1]))
    if ratios:
        out.append(
            f"pipelined / slowest stage: median {median(ratios):.2f}, worst {max(ratios):.2f} "
            f"(target <= 1.2): {'met' if max(ratios) <= 1.2 else 'missed'}"
        )
        out.append(
            f"pipelined / CPU floor of {os.cpu_count()} cores: median "
            f"{median(bound_ratios):.2f}, worst {max(bound_ratios):.2f}"
        )
        if over:
            out.append(
                f"cells over 1.2: {len(over)} of {len(ratios)}; their pipelined moves kept "
                f"{min(b for b, _ in over):.2f}-{max(b for b, _ in over):.2f} of "
                f"{os.cpu_count()} cores busy and took "
                f"{min(f for _, f in over):.2f}-{max(f for _, f in over):.2f}x their CPU floor"
            )
    pauses = [r["ratio"] for res in results.values() for r in res["pauses"]]
    if pauses:
        out.append(
            f"migration pause / ITL: median {median(pauses):.2f}, worst {max(pauses):.2f} "
            f"(target <= 2): {'met' if median(pauses) <= 2 else 'missed'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.client:
        return run_client(args)
    results: dict[str, dict] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shardwire-bench-kv-") as tmp:
        logs = Path(args.logs or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for run, link in enumerate(names(args.links)):
            print(f"link {_link_name(link)}:", flush=True)
            results[link] = run_link(args, link, logs, run)
    text = report(results)
    summary = targets(results)
    print(text)
    print("\n".join(summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "seconds": time.monotonic() - started,
                "links": results,
                "targets": summary,
                "report": text,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
