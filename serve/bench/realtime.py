"""`shardwire bench realtime`: real-time dialogue and live translation.

Side by side in one run, on the same weights (a preset with random weights),
with two deployments started here (`shardwire up`, one replica each):
1. per-turn time to first token (TTFT) for turns 1..N of a dialogue, three ways:
   a gateway session (`append_only`, prefix caching on: only the new turn is sent
   and prefilled), resending the whole history to a replica without prefix
   caching (`--no-prefix-caching`: every turn prefills everything), and resending
   the whole history with prefix caching on;
2. per-segment latency of one `TranslateLive` stream (the earlier segments as
   context) against one `Translate` call per segment, both on the caching
   deployment, each segment sent when the previous one is translated.
The turns alternate between the systems so that both see the same machine load.
Results are printed as markdown tables and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WORDS = (
    "the",
    "weather",
    "train",
    "station",
    "river",
    "music",
    "bread",
    "morning",
    "evening",
    "city",
    "window",
    "question",
    "answer",
    "table",
    "coffee",
    "market",
    "garden",
    "mountain",
    "letter",
    "story",
    "friend",
    "travel",
    "ticket",
    "museum",
    "history",
    "language",
    "people",
    "street",
    "kitchen",
    "summer",
    "winter",
)


@dataclass(frozen=True)
class TurnResult:
    turn: int
    # Prompt tokens of the session's turn (the whole conversation).
    prompt_tokens: int
    session_ttft_ms: float
    session_cached_tokens: int
    resend_ttft_ms: float
    resend_cached_ttft_ms: float
    resend_cached_tokens: int

    @property
    def ratio(self) -> float:
        return self.session_ttft_ms / self.resend_ttft_ms


@dataclass(frozen=True)
class SegmentResult:
    segment: int
    live_ttft_ms: float
    live_total_ms: float
    live_prompt_tokens: int
    live_cached_tokens: int
    call_ttft_ms: float
    call_total_ms: float
    call_prompt_tokens: int


def sentence(rng: random.Random, num_chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < num_chars:
        words.append(rng.choice(WORDS))
    return " ".join(words).capitalize()[:num_chars].rstrip() + "."


def start_deployment(
    model: str, port: int, prefix_caching: bool, kv_mb: int, extra: Sequence[str] = ()
) -> subprocess.Popen:
    """`shardwire up` on `port`, with `extra` arguments to `up`."""
    argv = [
        sys.executable, "-m", "serve.cli", "--log-level", "warning", "up",
        "--model", model, "--port", str(port), "--metrics-port", "-1",
        "--kv-cache-mb", str(kv_mb), "--no-restart", *extra,
    ]  # fmt: skip
    if not prefix_caching:
        argv.append("--no-prefix-caching")
    return subprocess.Popen(argv, start_new_session=True)


def wait_and_warm_up(deployments: Sequence[tuple[str, subprocess.Popen]]) -> None:
    """Waits until every deployment serves, then sends each one a short chat."""
    import asyncio

    from clients.client import Client
    from serve.launch import wait_serving

    for target, proc in deployments:
        asyncio.run(wait_serving(target, 300, proc))
    for target, _ in deployments:
        with Client(target, timeout=300) as client:
            list(client.chat("warm up", max_tokens=4))


def stop_deployment(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass(frozen=True)
class Timed:
    ttft_s: float
    total_s: float
    text: str
    last: Any  # the stream's last chunk


def _timed(chunks: Iterator[Any]) -> Timed:
    """Client-side clocks of a stream that starts when first iterated (now)."""
    start = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    last = None
    for chunk in chunks:
        if first is None and chunk.token_ids:
            first = time.perf_counter() - start
        pieces.append(chunk.text)
        last = chunk
    total = time.perf_counter() - start
    return Timed(total if first is None else first, total, "".join(pieces), last)


def bench_dialogue(
    cached: str, uncached: str, args: argparse.Namespace, rng: random.Random
) -> list[TurnResult]:
    """One dialogue of args.turns turns on the three systems, turn by turn."""
    from clients.client import Client

    users = [sentence(rng, args.turn_chars) for _ in range(args.turns)]
    other = [sentence(rng, args.turn_chars) for _ in range(args.turns)]
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
    results = []
    with Client(cached, timeout=600) as a, Client(uncached, timeout=600) as b:
        session_id = ""
        resend: list[dict[str, str]] = []
        resend_cached: list[dict[str, str]] = []
        for t in range(args.turns):
            resend.append({"role": "user", "content": users[t]})
            resend_cached.append({"role": "user", "content": other[t]})
            # Streams start when first iterated, inside _timed.
            runs = {
                "session": a.chat(users[t], session_id=session_id, append_only=True, **sampling),
                "resend": b.chat(resend, **sampling),
                "resend_cached": a.chat(resend_cached, **sampling),
            }
            order = list(runs) if t % 2 == 0 else list(reversed(runs))
            out = {name: _timed(runs[name]) for name in order}
            session, plain, plain_cached = out["session"], out["resend"], out["resend_cached"]
            session_id = session.last.session_id
            resend.append({"role": "assistant", "content": plain.text})
            resend_cached.append({"role": "assistant", "content": plain_cached.text})
            results.append(
                TurnResult(
                    turn=t + 1,
                    prompt_tokens=session.last.usage.prompt_tokens,
                    session_ttft_ms=session.ttft_s * 1e3,
                    session_cached_tokens=session.last.usage.cached_prompt_tokens,
                    resend_ttft_ms=plain.ttft_s * 1e3,
                    resend_cached_ttft_ms=plain_cached.ttft_s * 1e3,
                    resend_cached_tokens=plain_cached.last.usage.cached_prompt_tokens,
                )
            )
            r = results[-1]
            print(
                f"  turn {r.turn}: {r.prompt_tokens} prompt tokens, session "
                f"{r.session_ttft_ms:.0f} ms, resend {r.resend_ttft_ms:.0f} ms",
                flush=True,
            )
        a.close_session(session_id)
    return results


def bench_translation(
    target: str, args: argparse.Namespace, rng: random.Random
) -> list[SegmentResult]:
    """Segments sent one at a time, each when the previous one is translated."""
    from clients.client import Client

    segments = [sentence(rng, args.segment_chars) for _ in range(args.segments)]
    sampling = {"max_tokens": args.segment_max_tokens, "temperature": 0.0, "ignore_eos": True}
    feed: queue.Queue[str | None] = queue.Queue()

    def fed() -> Iterator[str]:
        while (item := feed.get()) is not None:
            yield item

    results = []
    with Client(target, timeout=600) as client:
        stream = client.translate_live(fed(), source="en", target="de", **sampling)
        for k, segment in enumerate(segments):
            feed.put(segment)
            start = time.perf_counter()
            first: float | None = None
            while True:
                chunk = next(stream)
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - start
                if chunk.is_last:
                    break
            live_total = time.perf_counter() - start
            call = _timed(client.translate(segment, source="en", target="de", **sampling))
            results.append(
                SegmentResult(
                    segment=k,
                    live_ttft_ms=(first or live_total) * 1e3,
                    live_total_ms=live_total * 1e3,
                    live_prompt_tokens=chunk.usage.prompt_tokens,
                    live_cached_tokens=chunk.usage.cached_prompt_tokens,
                    call_ttft_ms=call.ttft_s * 1e3,
                    call_total_ms=call.total_s * 1e3,
                    call_prompt_tokens=call.last.usage.prompt_tokens,
                )
            )
        feed.put(None)
        for _ in stream:
            pass
    return results


def average_turns(runs: list[list[TurnResult]]) -> list[TurnResult]:
    """Per turn, the median over dialogues."""
    out = []
    for turn in zip(*runs, strict=True):
        med = statistics.median
        out.append(
            TurnResult(
                turn=turn[0].turn,
                prompt_tokens=round(med(r.prompt_tokens for r in turn)),
                session_ttft_ms=med(r.session_ttft_ms for r in turn),
                session_cached_tokens=round(med(r.session_cached_tokens for r in turn)),
                resend_ttft_ms=med(r.resend_ttft_ms for r in turn),
                resend_cached_ttft_ms=med(r.resend_cached_ttft_ms for r in turn),
                resend_cached_tokens=round(med(r.resend_cached_tokens for r in turn)),
            )
        )
    return out


def dialogue_table(turns: list[TurnResult]) -> str:
    lines = [
        "| turn | prompt tokens | session TTFT ms | cached | resend, no prefix cache TTFT ms "
        "| session / resend | resend, prefix cache TTFT ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in turns:
        lines.append(
            f"| {r.turn} | {r.prompt_tokens} | {r.session_ttft_ms:.0f} | "
            f"{r.session_cached_tokens} | {r.resend_ttft_ms:.0f} | {r.ratio:.2f} | "
            f"{r.resend_cached_ttft_ms:.0f} |"
        )
    return "\n".join(lines)


def translation_table(segments: list[SegmentResult]) -> str:
    lines = [
        "| segment | TranslateLive TTFT ms | total ms | prompt (cached) tokens "
        "| Translate TTFT ms | total ms | prompt tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in segments:
        lines.append(
            f"| {r.segment} | {r.live_ttft_ms:.0f} | {r.live_total_ms:.0f} | "
            f"{r.live_prompt_tokens} ({r.live_cached_tokens}) | {r.call_ttft_ms:.0f} | "
            f"{r.call_total_ms:.0f} | {r.call_prompt_tokens} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwire bench realtime", description=__doc__)
    p.add_argument("--model", default="small", help="preset (tiny: a quick run)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--dialogues", type=int, default=2, help="each turn's TTFT is their median")
    p.add_argument("--turn-chars", type=int, default=200, help="length of each user turn")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length (fixed)")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--segment-chars", type=int, default=120)
    p.add_argument("--segment-max-tokens", type=int, default=24)
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/realtime.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))

    from serve.launch import free_port

    rng = random.Random(args.seed)
    ports = free_port(), free_port()
    cached, uncached = (f"127.0.0.1:{p}" for p in ports)
    procs = [
        start_deployment(args.model, ports[0], True, args.kv_cache_mb),
        start_deployment(args.model, ports[1], False, args.kv_cache_mb),
    ]
    began = time.perf_counter()
    try:
        wait_and_warm_up(list(zip((cached, uncached), procs, strict=True)))
        runs = []
        for d in range(args.dialogues):
            print(f"dialogue {d + 1}/{args.dialogues}", flush=True)
            runs.append(bench_dialogue(cached, uncached, args, rng))
        print("live translation", flush=True)
        segments = bench_translation(cached, args, rng)
    finally:
        for proc in procs:
            stop_deployment(proc)
    turns = average_turns(runs)
    last = turns[-1]
    live = [s.live_total_ms for s in segments[1:]] or [s.live_total_ms for s in segments]
    calls = [s.call_total_ms for s in segments[1:]] or [s.call_total_ms for s in segments]
    summary = {
        f"turn{last.turn}_session_over_resend_ttft": last.ratio,
        "target_turn_ttft_ratio": 0.5,
        "meets_target": last.ratio <= 0.5,
        "live_over_call_segment_latency_median": statistics.median(live) / statistics.median(calls),
    }
    print(
        f"\nmodel={args.model} turns={args.turns} dialogues={args.dialogues} "
        f"turn_chars={args.turn_chars} max_tokens={args.max_tokens} (ignore_eos, greedy); "
        f"{os.cpu_count()} CPUs, {time.perf_counter() - began:.0f} s\n"
    )
    print(dialogue_table(turns))
    print()
    print(translation_table(segments))
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "turns": [{**asdict(r), "ratio": r.ratio} for r in turns],
                "dialogues": [[asdict(r) for r in run] for run in runs],
                "segments": [asdict(s) for s in segments],
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0
