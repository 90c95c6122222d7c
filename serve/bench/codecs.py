"""`shardwire bench codecs`: wire size, error and speed of every activation codec.

For each codec and message size (tokens x hidden, bf16 activations), side by side
in one run: wire bytes / bf16 bytes, relative error (RMS error / RMS x) and the
median encode and decode times. Activations are synthetic with the statistics
that matter for quantization: heavy-tailed values (Student-t, 4 degrees of
freedom), per-channel scales spread log-normally, and 0.5% of channels 30x
larger (the outlier channels of LLM activations). With `--preset NAME`, the
row-parallel outputs (o_proj, down_proj) of a forward pass of that preset are
measured too. A second table compares kmeans4 with int4 at (nearly) equal bytes.

Printed as markdown tables; written as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from serve.comm.codecs import BLOCK_LABELS, CodecSpec, decode, encode

logger = logging.getLogger(__name__)

DEFAULT_CODECS = (*BLOCK_LABELS, "kmeans4")
KMEANS_RIVALS = ((0, "kmeans4"), (32, "int4"), (128, "int4"), (256, "int4"))


@dataclass(frozen=True)
class CodecResult:
    codec: str
    source: str
    tokens: int
    hidden: int
    raw_bytes: int  # bytes of the bf16 message
    wire_bytes: int
    wire_ratio: float  # wire bytes / bf16 bytes
    rel_error: float  # RMS(decoded - x) / RMS(x)
    encode_us: float  # median
    decode_us: float  # median


def synthetic_activations(tokens: int, hidden: int, seed: int = 0) -> torch.Tensor:
    """[tokens, hidden] bf16: Student-t(4) values, log-normal channel scales, 0.5% of
    channels (at least 2) 30x larger."""
    gen = torch.Generator().manual_seed(seed)
    channel = torch.exp(torch.randn(hidden, generator=gen) * 0.5)  # [hidden]
    normal = torch.randn(tokens, hidden, generator=gen)
    chi2 = torch.randn(4, tokens, hidden, generator=gen).pow(2).sum(0) / 4
    x = normal / chi2.sqrt() * channel  # Student-t with 4 degrees of freedom, scaled
    outliers = torch.randperm(hidden, generator=gen)[: max(2, hidden // 200)]
    x[:, outliers] *= 30
    return x.to(torch.bfloat16)


def preset_activations(preset: str, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The all-reduced tensors of one prefill of `tokens` random tokens through a
    preset: o_proj and down_proj outputs of every layer, concatenated per kind."""
    from serve.model.attention import AttentionMetadata, PrefillChunk
    from serve.model.loader import load_model

    model = load_model(preset, dtype="bfloat16", seed=seed)
    cfg = model.config
    block = 16
    blocks = -(-tokens // block)
    kv_caches = [
        torch.zeros(2, blocks, block, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16)
        for _ in model.model.layers
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(tokens),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=[PrefillChunk(0, tokens, tokens, torch.arange(blocks))],
        block_size=block,
    )
    captured: dict[str, list[torch.Tensor]] = {"o_proj": [], "down_proj": []}

    def keep(kind: str) -> Callable:
        return lambda _mod, _inp, out: captured[kind].append(out.detach().clone())

    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.o_proj.register_forward_hook(keep("o_proj")))
        hooks.append(layer.mlp.down_proj.register_forward_hook(keep("down_proj")))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=gen)
    with torch.inference_mode():
        model(ids, torch.arange(tokens), kv_caches, meta)
    for hook in hooks:
        hook.remove()
    return {f"{preset}:{kind}": torch.cat(parts) for kind, parts in captured.items()}


def measure(x: torch.Tensor, spec: CodecSpec, label: str, source: str, repeats: int) -> CodecResult:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    enc_times, dec_times = [], []
    enc = encode(x, spec)  # warm-up
    y = decode(enc)
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        enc = encode(x, spec)
        sync()
        mid = time.perf_counter()
        y = decode(enc)
        sync()
        enc_times.append(mid - start)
        dec_times.append(time.perf_counter() - mid)
    xf = x.float()
    rms = xf.pow(2).mean().sqrt().item()
    err = (y.to(x.device).float() - xf).pow(2).mean().sqrt().item()
    raw = x.numel() * 2
    return CodecResult(
        codec=label,
        source=source,
        tokens=x.shape[0],
        hidden=x.shape[1],
        raw_bytes=raw,
        wire_bytes=enc.nbytes,
        wire_ratio=enc.nbytes / raw,
        rel_error=err / rms if rms else 0.0,
        encode_us=statistics.median(enc_times) * 1e6,
        decode_us=statistics.median(dec_times) * 1e6,
    )


def _table(rows: list[CodecResult], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| source | tokens x hidden | codec | wire/bf16 | rel. error | encode us | decode us |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} | {r.tokens} x {r.hidden} | {r.codec} | {r.wire_ratio:.3f} | "
            f"{r.rel_error:.2e} | {r.encode_us:.0f} | {r.decode_us:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardwire bench codecs", description=__doc__)
    parser.add_argument("--codecs", nargs="+", default=list(DEFAULT_CODECS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 2048])
    parser.add_argument("--hidden", nargs="+", type=int, default=[896, 4096])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is kept")
    parser.add_argument("--zstd-level", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default=None, help="also measure this preset's activations")
    parser.add_argument("--preset-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", default="bench-results/codecs.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = {text: CodecSpec.parse(text, zstd_level=args.zstd_level) for text in args.codecs}

    rows: list[CodecResult] = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            x = synthetic_activations(tokens, hidden).to(args.device)
            for text, spec in specs.items():
                rows.append(measure(x, spec, text, "synthetic", args.repeats))
                logger.debug("measured %s", rows[-1])
    print(_table(rows, f"codecs on {args.device} (bf16 activations, zstd level {args.zstd_level})"))

    # kmeans4 vs int4 at (nearly) equal bytes: int4 at group 128/256 spends 3%/1.6% more
    sources = {"synthetic": synthetic_activations(max(args.tokens), max(args.hidden), seed=1)}
    if args.preset:
        sources.update(preset_activations(args.preset, args.preset_tokens))
    rivals: list[CodecResult] = []
    for source, x in sources.items():
        for block, name in KMEANS_RIVALS:
            label = f"{name} g{block}" if block else name
            spec = CodecSpec(name, block_size=block)
            rivals.append(measure(x.to(args.device), spec, label, source, args.repeats))
    print()
    print(_table(rivals, "kmeans4 vs int4 (rel. error is RMS; square it for relative MSE)"))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "codecs",
        "config": vars(args),
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": args.device,
        },
        "results": [asdict(r) for r in rows],
        "kmeans4_vs_int4": [asdict(r) for r in rivals],
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
    return 0
