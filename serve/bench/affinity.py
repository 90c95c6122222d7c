"""`shardwire bench affinity`: routing requests without a session_id by prompt prefix.

Clients that resend the whole dialogue every turn (no `session_id`, as an
OpenAI-style client does) only hit a replica's prefix cache when the turn lands
on the replica that served the previous one. Two deployments run side by side
here (`shardwire up --replicas 2`, the same preset and seed): one routes by
prompt prefix with a load bound (the default), the other by load alone
(`--no-prefix-affinity`). The same workload runs on each, in alternating order
per round so both see the same machine load: D dialogues at once, each T turns,
every turn the whole conversation so far plus a new user message, greedy.

Per deployment: the share of turn-2+ prompt tokens served from a prefix cache,
TTFT of turns 2+ (median, p90), the workload's wall time, how the turns spread
over the replicas; and the answers of the two, which must agree token for token
(routing changes where a prompt is computed, not what it computes). Printed as
markdown and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.bench.realtime import sentence, start_deployment, stop_deployment, wait_and_warm_up
from serve.bench.stats import median, percentile

MODES = ("prefix affinity", "load only")


@dataclass(frozen=True)
class TurnRecord:
    dialogue: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_ms: float
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ModeResult:
    mode: str
    wall_s: float
    cached_share: float  # turns 2+: cached prompt tokens / prompt tokens
    ttft_median_ms: float  # turns 2+
    ttft_p90_ms: float
    turns: list[TurnRecord]


def run_dialogue(
    target: str, index: int, users: list[str], args: argparse.Namespace, out: list[TurnRecord]
) -> None:
    """One dialogue, turn by turn, resending the conversation each time."""
    from clients.client import Client

    messages: list[dict[str, str]] = []
    sampling = {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True}
    with Client(target, timeout=600) as client:
        for turn, text in enumerate(users, start=1):
            messages.append({"role": "user", "content": text})
            start = time.perf_counter()
            ttft: float | None = None
            pieces: list[str] = []
            ids: list[int] = []
            last = None
            for chunk in client.chat(messages, **sampling):
                if ttft is None and chunk.token_ids:
                    ttft = time.perf_counter() - start
                pieces.append(chunk.text)
                ids.extend(chunk.token_ids)
                last = chunk
            assert last is not None and last.usage is not None
            messages.append({"role": "assistant", "content": "".join(pieces)})
            out.append(
                TurnRecord(
                    dialogue=index,
                    turn=turn,
                    prompt_tokens=last.usage.prompt_tokens,
                    cached_tokens=last.usage.cached_prompt_tokens,
                    ttft_ms=(ttft if ttft is not None else time.perf_counter() - start) * 1e3,
                    token_ids=tuple(ids),
                )
            )


def run_workload(
    target: str, mode: str, dialogues: list[list[str]], args: argparse.Namespace
) -> ModeResult:
    """Every dialogue at once, each on its own thread."""
    records: list[TurnRecord] = []
    threads = [
        threading.Thread(target=run_dialogue, args=(target, i, users, args, records))
        for i, users in enumerate(dialogues)
    ]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
        time.sleep(args.stagger_s)
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    later = [r for r in records if r.turn > 1]
    if len(records) != len(dialogues) * args.turns:
        raise RuntimeError(f"{mode}: {len(records)} turns finished, not all of them")
    prompt = sum(r.prompt_tokens for r in later)
    ttfts = [r.ttft_ms for r in later]
    return ModeResult(
        mode=mode,
        wall_s=wall,
        cached_share=sum(r.cached_tokens for r in later) / prompt if prompt else 0.0,
        ttft_median_ms=median(ttfts),
        ttft_p90_ms=percentile(ttfts, 90),
        turns=sorted(records, key=lambda r: (r.dialogue, r.turn)),
    )


def agreement(a: ModeResult, b: ModeResult) -> tuple[int, int]:
    """(tokens equal at the same position, tokens) over all answers."""
    same = total = 0
    for x, y in zip(a.turns, b.turns, strict=True):
        total += max(len(x.token_ids), len(y.token_ids))
        same += sum(p == q for p, q in zip(x.token_ids, y.token_ids, strict=False))
    return same, total


def report(results: dict[str, list[ModeResult]], same: int, total: int) -> str:
    lines = [
        "Dialogues without a session_id over 2 replicas (turns 2+; median over rounds):",
        "",
        "| routing | prompt tokens from a prefix cache | TTFT median ms | TTFT p90 ms "
        "| workload s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        runs = results[mode]
        lines.append(
            f"| {mode} | {median([r.cached_share for r in runs]):.1%} "
            f"| {median([r.ttft_median_ms for r in runs]):.0f} "
            f"| {median([r.ttft_p90_ms for r in runs]):.0f} "
            f"| {median([r.wall_s for r in runs]):.1f} |"
        )
    a, b = (median([r.ttft_median_ms for r in results[m]]) for m in MODES)
    wa, wb = (median([r.wall_s for r in results[m]]) for m in MODES)
    lines += [
        "",
        f"prefix affinity / load only: TTFT median {a / b:.2f}x, workload time {wa / wb:.2f}x",
        f"answers that agree token for token: {same}/{total} ({same / max(total, 1):.1%})",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwire bench affinity", description=__doc__)
    p.add_argument("--model", default="small", help="preset (tiny: a quick run)")
    p.add_argument("--dialogues", type=int, default=8, help="dialogues at once")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-chars", type=int, default=300, help="length of each user turn")
    p.add_argument("--max-tokens", type=int, default=16, help="answer length (fixed)")
    p.add_argument("--rounds", type=int, default=2, help="workloads per deployment")
    p.add_argument("--stagger-s", type=float, default=0.05, help="between dialogue starts")
    p.add_argument("--kv-cache-mb", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/affinity.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    from serve.launch import free_port

    ports = {mode: free_port() for mode in MODES}
    targets = {mode: f"127.0.0.1:{port}" for mode, port in ports.items()}
    procs = {}
    for mode in MODES:
        extra = ["--replicas", "2", *(["--no-prefix-affinity"] if mode == "load only" else [])]
        procs[mode] = start_deployment(args.model, ports[mode], True, args.kv_cache_mb, extra)
    began = time.perf_counter()
    results: dict[str, list[ModeResult]] = {mode: [] for mode in MODES}
    try:
        wait_and_warm_up([(targets[mode], procs[mode]) for mode in MODES])
        for round_index in range(args.rounds):
            # Fresh dialogues each round (nothing cached from the last one), the same
            # ones for both deployments.
            rng = random.Random(args.seed + round_index)
            dialogues = [
                [sentence(rng, args.turn_chars) for _ in range(args.turns)]
                for _ in range(args.dialogues)
            ]
            order = MODES if round_index % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                result = run_workload(targets[mode], mode, dialogues, args)
                results[mode].append(result)
                print(
                    f"round {round_index + 1} {mode}: {result.cached_share:.1%} cached, "
                    f"TTFT median {result.ttft_median_ms:.0f} ms, {result.wall_s:.1f} s",
                    flush=True,
                )
    finally:
        for proc in procs.values():
            stop_deployment(proc)
    same = total = 0
    for a, b in zip(results[MODES[0]], results[MODES[1]], strict=True):
        s, t = agreement(a, b)
        same, total = same + s, total + t
    text = report(results, same, total)
    print(
        f"\nmodel={args.model} dialogues={args.dialogues} turns={args.turns} "
        f"turn_chars={args.turn_chars} max_tokens={args.max_tokens} rounds={args.rounds}; "
        f"{os.cpu_count()} CPUs, {time.perf_counter() - began:.0f} s\n"
    )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "results": {m: [asdict(r) for r in runs] for m, runs in results.items()},
                "agreement": {"same": same, "total": total},
                "report": text,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0
