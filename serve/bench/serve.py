"""`shardwire bench serve`: serving throughput and latency against transformers.

Side by side in one run, on the same weights (a preset with random weights) in
the same dtype (bfloat16 by default, the usual serving dtype; `--dtype float32`
for full precision):
1. shardwire through the full gRPC path (`shardwire up` in a child process),
   at each concurrency level: tokens/s, TTFT and inter-token latency p50/p99;
2. transformers `generate` in this process: one request at a time and static
   batches of the same sizes.
Results are printed as a markdown table and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.bench.stats import percentile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelResult:
    system: str
    concurrency: int
    num_requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


async def _one_request(
    client, prompt: list[int], max_tokens: int
) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    arrivals: list[float] = []
    n = 0
    stream = client.generate(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for chunk in stream:
        if chunk.token_ids:
            arrivals.extend([time.perf_counter()] * len(chunk.token_ids))
            n += len(chunk.token_ids)
    ttft = arrivals[0] - start
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return ttft, gaps, n


async def bench_shardwire_level(
    target: str, concurrency: int, prompts: list[list[int]], max_tokens: int
) -> LevelResult:
    from clients.client import AsyncClient

    queue = list(prompts)
    ttfts: list[float] = []
    itls: list[float] = []
    total = 0

    async with AsyncClient(target) as client:

        async def worker() -> None:
            nonlocal total
            while queue:
                prompt = queue.pop()
                ttft, gaps, n = await _one_request(client, prompt, max_tokens)
                ttfts.append(ttft)
                itls.extend(gaps)
                total += n

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LevelResult(
        "shardwire",
        concurrency,
        len(prompts),
        total,
        wall,
        total / wall,
        percentile(ttfts, 50) * 1e3,
        percentile(ttfts, 99) * 1e3,
        percentile(itls, 50) * 1e3,
        percentile(itls, 99) * 1e3,
    )


def bench_transformers(hf, batch: int, prompts: list[list[int]], max_tokens: int) -> LevelResult:
    """transformers generate on the same weights: static batches of `batch` prompts."""
    import torch

    ttfts: list[float] = []
    itls: list[float] = []
    total = 0
    with torch.inference_mode():
        warm = torch.tensor(prompts[:batch])
        hf.generate(warm, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            mask = torch.ones_like(ids)
            t0 = time.perf_counter()
            hf.generate(
                ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False
            )
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            dt = time.perf_counter() - t0
            n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
            total += n
            ttfts.extend([ttft] * ids.shape[0])
            itls.append(max(dt - ttft, 0.0) / max(max_tokens - 1, 1))
        wall = time.perf_counter() - start
    # wall includes the separate TTFT probes; tokens/s counts only the full runs.
    gen_wall = wall - sum(ttfts[::batch])
    return LevelResult(
        "transformers",
        batch,
        len(prompts),
        total,
        gen_wall,
        total / gen_wall,
        percentile(ttfts, 50) * 1e3,
        percentile(ttfts, 99) * 1e3,
        percentile(itls, 50) * 1e3,
        percentile(itls, 99) * 1e3,
    )


def hf_model_from_preset(model_name: str, dtype: str = "float32"):
    """A transformers LlamaForCausalLM holding exactly the preset's weights (in `dtype`,
    rounded from the same float32 draws as shardwire's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from serve.model.loader import load_model

    ours = load_model(model_name, dtype=dtype)
    c = ours.config
    hc = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id,
        eos_token_id=list(c.eos_token_ids),
    )
    hf = LlamaForCausalLM(hc).eval()
    for param in hf.parameters():  # buffers (rotary frequencies) stay float32
        param.data = param.data.to(ours.dtype)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return hf


def start_server(
    model: str, port: int, max_num_seqs: int, num_threads: int, dtype: str = "float32"
) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "serve.cli",
        "--log-level",
        "warning",
        "up",
        "--model",
        model,
        "--port",
        str(port),
        "--num-threads",
        str(num_threads),
        "--max-num-seqs",
        str(max_num_seqs),
        "--dtype",
        dtype,
    ]
    return subprocess.Popen(argv, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def markdown_table(results: list[LevelResult]) -> str:
    lines = [
        "| system | concurrency | requests | tokens/s "
        "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.num_requests} | {r.tokens_per_s:.1f} | "
            f"{r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.itl_p50_ms:.1f} | {r.itl_p99_ms:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwire bench serve", description=__doc__)
    p.add_argument("--model", default="small", help="preset (the transformers side needs a preset)")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="weights and activations of both systems",
    )
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=0, help="0: max(2 x concurrency, 4)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--num-threads", type=int, default=0, help="torch threads of the replica (0: default)"
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default="bench-results/serve.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(argv or []))
    from serve.launch import free_port, wait_serving
    from serve.model.loader import load_config

    levels = [int(x) for x in args.concurrency.split(",")]
    vocab = load_config(args.model).vocab_size
    port = args.port or free_port()
    target = f"127.0.0.1:{port}"
    results: list[LevelResult] = []
    per_level = {c: args.requests_per_level or max(2 * c, 4) for c in levels}
    proc = start_server(args.model, port, max(levels), args.num_threads, args.dtype)
    try:
        asyncio.run(wait_serving(target, 300, proc))
        warm = make_prompts(2, args.prompt_len, vocab, seed=99)
        asyncio.run(bench_shardwire_level(target, 2, warm, 8))
        for c in levels:
            prompts = make_prompts(per_level[c], args.prompt_len, vocab, seed=c)
            r = asyncio.run(bench_shardwire_level(target, c, prompts, args.max_tokens))
            print(markdown_table([r]).splitlines()[-1], flush=True)
            results.append(r)
    finally:
        stop_server(proc)
    if not args.skip_transformers:
        hf = hf_model_from_preset(args.model, args.dtype)
        for c in levels:
            prompts = make_prompts(per_level[c], args.prompt_len, vocab, seed=c)
            r = bench_transformers(hf, c, prompts, args.max_tokens)
            print(markdown_table([r]).splitlines()[-1], flush=True)
            results.append(r)
    table = markdown_table(results)
    ours = {r.concurrency: r for r in results if r.system == "shardwire"}
    theirs = {r.concurrency: r for r in results if r.system == "transformers"}
    summary = {}
    if 1 in ours:
        if 1 in theirs:
            summary["single_stream_vs_transformers"] = ours[1].tokens_per_s / theirs[1].tokens_per_s
        top = max(ours)
        summary[f"aggregate_c{top}_vs_single_stream"] = (
            ours[top].tokens_per_s / ours[1].tokens_per_s
        )
    print(
        f"\nmodel={args.model} dtype={args.dtype} prompt_len={args.prompt_len} "
        f"max_tokens={args.max_tokens}\n"
    )
    print(table)
    for k, v in summary.items():
        print(f"{k}: {v:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "dtype": args.dtype,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "results": [asdict(r) for r in results],
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0
