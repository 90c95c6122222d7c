"""The rank processes behind `shardwire bench tp`'s accuracy and step timings.

Every rank runs the real tensor-parallel path in-process: `load_rank` (its
slice of the weights, the gloo group), a Communicator per codec, the leader's
LLMEngine and ModelRunner sending step plans over the PlanChannel, and the
other ranks' ModelRunner running them. Per codec, in one group:

1. free-running greedy generation through the engine (prompts x max_tokens),
   compared with the `none` run token by token;
2. teacher forcing: `none`'s sequences (prompt + generated tokens) forced
   through the runner's forward, logits of every generated position gathered
   on rank 0 (float32): KL(none || codec) and top-1 agreement per position;
3. the per-codec Communicator counters (raw and wire bytes per codec used);
4. optional step timings: one prefill step of N tokens, whole and cut into
   micro-chunks whose all-reduces overlap the next chunk's compute.

The phases are fixed by the command line, which every rank gets alike: each
rank walks the same sequence, and the leader ends each engine phase with a
stop on the PlanChannel. Only tensors cross between ranks; rank 0 writes the
results as JSON.

    python -m serve.bench.tp_harness --rank R --world 2 --master ADDR:PORT --out r.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serve.bench.stats import median

if TYPE_CHECKING:  # torch loads lazily: `--help` and the driver stay light
    import torch

    from serve.comm.collectives import Communicator
    from serve.config import EngineConfig
    from serve.dist.group import OverlapPolicy, ParallelGroup, PlanChannel
    from serve.dist.plan import StepPlan
    from serve.engine.engine import LLMEngine
    from serve.engine.runner import ModelRunner
    from serve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

REFERENCE = "none"
# Printable ASCII and newline: the byte tokens the presets' LM head can emit.
PRINTABLE = tuple(range(0x20, 0x7F)) + (0x0A,)


@dataclass(frozen=True)
class HarnessConfig:
    rank: int = 0
    world: int = 2
    master: str = "127.0.0.1:29500"
    model: str = "small"
    dtype: str = "float32"
    seed: int = 0
    # The reference codec `none` always runs first; others follow in order.
    codecs: tuple[str, ...] = ("none", "int8", "int4", "auto")
    accuracy: str = "lossy"
    zstd_level: int = 1
    small_message_bytes: int = 64 * 1024
    num_prompts: int = 20
    prompt_len: int = 64
    max_tokens: int = 64
    prompt_seed: int = 1234
    block_size: int = 16
    max_num_batched_tokens: int = 512
    # Step timings: prefill steps of this many tokens (0: none), per overlap
    # setting (1: the whole step; k: k micro-chunks).
    timing_tokens: int = 0
    timing_reps: int = 3
    overlap_chunks: tuple[int, ...] = (1, 2)
    # Idle time before each timed step (a shaped link's token bucket refills).
    timing_gap_s: float = 0.05
    threads: int = 1
    timeout_s: float = 600.0
    out: str = ""

    @property
    def run_order(self) -> tuple[str, ...]:
        return (REFERENCE, *[c for c in self.codecs if c != REFERENCE])


def parse_args(argv: list[str]) -> HarnessConfig:
    d = HarnessConfig()
    p = argparse.ArgumentParser(prog="python -m serve.bench.tp_harness", description=__doc__)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--world", type=int, default=d.world)
    p.add_argument("--master", default=d.master, help="ADDR:PORT of rank 0's rendezvous")
    p.add_argument("--model", default=d.model)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--codecs", default=",".join(d.codecs))
    p.add_argument("--accuracy", default=d.accuracy, help="policy of the auto codec")
    p.add_argument("--zstd-level", type=int, default=d.zstd_level)
    p.add_argument("--small-message-bytes", type=int, default=d.small_message_bytes)
    p.add_argument("--prompts", type=int, default=d.num_prompts)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--prompt-seed", type=int, default=d.prompt_seed)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--timing-tokens", type=int, default=d.timing_tokens)
    p.add_argument("--timing-reps", type=int, default=d.timing_reps)
    p.add_argument("--overlap-chunks", default=",".join(map(str, d.overlap_chunks)))
    p.add_argument("--timing-gap-s", type=float, default=d.timing_gap_s)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument("--out", default=d.out, help="JSON results (rank 0)")
    a = p.parse_args(argv)
    codecs = tuple(c.strip() for c in a.codecs.split(",") if c.strip())
    chunks = tuple(int(c) for c in a.overlap_chunks.split(",") if c.strip())
    if any(k < 1 for k in chunks):
        p.error("--overlap-chunks takes counts >= 1 (1: the whole step)")
    return HarnessConfig(
        a.rank, a.world, a.master, a.model, a.dtype, a.seed, codecs, a.accuracy, a.zstd_level,
        a.small_message_bytes, a.prompts, a.prompt_len, a.max_tokens, a.prompt_seed,
        HarnessConfig.block_size, a.max_num_batched_tokens, a.timing_tokens, a.timing_reps,
        chunks, a.timing_gap_s, a.threads, a.timeout_s, a.out,
    )  # fmt: skip


def make_prompts(n: int, length: int, seed: int, bos: int) -> list[list[int]]:
    """n prompts of `length` tokens: BOS, then random printable bytes."""
    rng = random.Random(seed)
    return [[bos] + [rng.choice(PRINTABLE) for _ in range(length - 1)] for _ in range(n)]


# -- step plans -------------------------------------------------------------------


def prefill_plan(seqs: list[list[int]], sample_from: list[int], block_size: int) -> StepPlan:
    """One step prefilling every sequence from scratch, each in its own KV
    blocks (sequence i after sequence i-1's); the sampled rows are each
    sequence's positions from sample_from[i] to its end."""
    import torch

    from serve.dist.plan import StepPlan
    from serve.model.attention import AttentionMetadata, PrefillChunk

    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    samples: list[int] = []
    chunks = []
    first_block = 0
    for seq, s in zip(seqs, sample_from, strict=True):
        n = len(seq)
        num_blocks = -(-n // block_size)
        table = torch.arange(first_block, first_block + num_blocks)
        chunks.append(PrefillChunk(len(ids), n, n, table))
        samples.extend(range(len(ids) + s, len(ids) + n))
        ids.extend(seq)
        pos.extend(range(n))
        slots.extend(first_block * block_size + q for q in range(n))
        first_block += num_blocks
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decode_tokens=0,
        decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long),
        prefills=chunks,
        block_size=block_size,
    )
    return StepPlan(
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(pos, dtype=torch.long),
        meta,
        torch.tensor(samples, dtype=torch.long),
    )


def kv_blocks_needed(cfg: HarnessConfig) -> int:
    per_seq = -(-(cfg.prompt_len + cfg.max_tokens) // cfg.block_size)
    timing = -(-cfg.timing_tokens // cfg.block_size)
    return max(cfg.num_prompts * per_seq, timing) + 4


# -- the leader -------------------------------------------------------------------


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of every prompt, all in one continuous batch."""
    from serve.engine.request import SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(engine.make_request(f"p{i}", p, sampling))
    out: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[f"p{i}"] for i in range(len(prompts))]


def teacher_force(
    runner: ModelRunner,
    channel: PlanChannel,
    prompts: list[list[int]],
    generated: list[list[int]],
    cfg: HarnessConfig,
) -> torch.Tensor:
    """Logits [num_prompts * max_tokens, vocab] (float32) of every generated
    position, with prompt + generated tokens forced through the forward in
    steps of at most the engine's token budget."""
    import torch

    rows = []
    batch: list[list[int]] = []
    starts: list[int] = []

    def flush() -> None:
        if batch:
            plan = prefill_plan(batch, starts, cfg.block_size)
            channel.send_plan(plan)
            rows.append(runner.run(plan))
            batch.clear()
            starts.clear()

    for prompt, gen in zip(prompts, generated, strict=True):
        # Position len(prompt) - 1 + t predicts generated token t.
        seq = prompt + gen[:-1]
        if batch and sum(map(len, batch)) + len(seq) > cfg.max_num_batched_tokens:
            flush()
        batch.append(seq)
        starts.append(len(prompt) - 1)
    flush()
    return torch.cat(rows)


def compare(
    ref_logits: torch.Tensor,  # [positions, vocab] float32
    logits: torch.Tensor,
    ref_tokens: list[list[int]],
    tokens: list[list[int]],
) -> dict[str, float]:
    """Accuracy of one codec against the reference."""
    import torch

    ref_lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)  # [positions]
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double()
    # How close the reference's best two tokens are: flips happen at near-ties.
    best2 = ref_logits.topk(2, dim=-1).values
    margin = (best2[:, 0] - best2[:, 1]).double()
    flipped = margin[top1 == 0]
    pairs = list(zip(ref_tokens, tokens, strict=True))
    same = [a == b for r, t in pairs for a, b in zip(r, t, strict=True)]
    prefix = []
    for r, t in pairs:
        k = next((i for i, (a, b) in enumerate(zip(r, t, strict=True)) if a != b), len(r))
        prefix.append(k / max(len(r), 1))
    return {
        "positions": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(kl.quantile(0.99)) if kl.numel() else 0.0,
        "kl_max": float(kl.max()) if kl.numel() else 0.0,
        "top1_agreement": float(top1.mean()),
        "ref_margin_p50": float(margin.median()) if margin.numel() else 0.0,
        "flip_margin_max": float(flipped.max()) if flipped.numel() else 0.0,
        "free_run_agreement": sum(same) / max(len(same), 1),
        "free_run_prefix_fraction": sum(prefix) / max(len(prefix), 1),
        "free_run_identical": sum(1 for r, t in pairs if r == t),
    }


def coded_bytes(snapshot: dict[str, dict[str, float]], itemsize: int) -> dict[str, dict]:
    """Per codec used for all-reduces: raw and wire bytes, the wire ratio at
    the model's element size and against the same elements in bf16."""
    out = {}
    for name, c in snapshot.items():
        if name == "all_gather" or not c["raw_bytes"]:
            continue
        raw, wire = c["raw_bytes"], c["wire_bytes"]
        out[name] = {
            "messages": int(c["messages"]),
            "raw_bytes": int(raw),
            "wire_bytes": int(wire),
            "seconds": c["seconds"],
            "wire_vs_raw": wire / raw,
            "wire_vs_bf16": wire / (raw / itemsize * 2),
        }
    return out


def time_steps(
    runner: ModelRunner,
    group: ParallelGroup,
    channel: PlanChannel,
    cfg: HarnessConfig,
    prompt: list[int],
) -> dict:
    """Median wall time of one prefill step of the prompt on rank 0, per
    overlap setting, interleaved so a noisy stretch hits every setting; and
    how far each setting's logits are from the whole step's."""
    from serve.model.overlap import micro_chunk_bounds

    default = group.overlap
    times: dict[int, list[float]] = {k: [] for k in cfg.overlap_chunks}
    logits = {}
    cut = {}
    plan = prefill_plan([prompt], [len(prompt) - 1], cfg.block_size)
    w = runner.model.model.embed_tokens.weight  # [vocab_local, hidden]
    for k in cfg.overlap_chunks:
        group.overlap = overlap_policy(k)
        bounds = micro_chunk_bounds(plan.meta, len(prompt), group, w.shape[1], w.dtype)
        cut[k] = 0 if bounds is None else len(bounds) - 1
    for rep in range(cfg.timing_reps + 1):
        for k in cfg.overlap_chunks:
            group.overlap = overlap_policy(k)
            time.sleep(cfg.timing_gap_s)
            t0 = time.perf_counter()
            channel.send_plan(plan)
            out = runner.run(plan)
            if rep:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
            else:
                logits[k] = out
    group.overlap = default
    base = logits[cfg.overlap_chunks[0]]
    return {
        str(k): {
            "pieces": cut[k] or 1,  # what the step was cut into (1: whole)
            "median_ms": median(v) * 1e3,
            "min_ms": min(v, default=math.nan) * 1e3,
            "times_ms": [t * 1e3 for t in v],
            "max_abs_logit_diff": float((logits[k] - base).abs().max()),
            "same_argmax": bool((logits[k].argmax(-1) == base.argmax(-1)).all()),
        }
        for k, v in times.items()
    }


def overlap_policy(num_chunks: int) -> OverlapPolicy:
    """Micro-chunking of every timed step into num_chunks pieces (1: off)."""
    from serve.dist.group import OverlapPolicy

    if num_chunks < 2:
        return OverlapPolicy()
    return OverlapPolicy(
        min_tokens=1, num_chunks=num_chunks, min_chunk_tokens=1, link_bound_only=False
    )


# -- both ranks -------------------------------------------------------------------


def run(cfg: HarnessConfig) -> dict | None:
    import torch
    import torch.distributed as dist

    from serve.comm.collectives import CommConfig, Communicator
    from serve.config import EngineConfig, ShardConfig, TPConfig
    from serve.dist.worker import load_rank, run_worker
    from serve.engine.runner import ModelRunner

    addr, port = cfg.master.rsplit(":", 1)
    shard = ShardConfig(
        model=cfg.model,
        dtype=cfg.dtype,
        seed=cfg.seed,
        num_threads=cfg.threads,
        tp=TPConfig(
            size=cfg.world,
            rank=cfg.rank,
            master_addr=addr,
            master_port=int(port),
            timeout_s=cfg.timeout_s,
        ),
    )
    model, channel = load_rank(shard)
    if channel is None:
        raise SystemExit("the harness needs a TP group of two or more ranks")
    group = model.group
    engine_cfg = EngineConfig(
        block_size=cfg.block_size,
        num_kv_blocks=kv_blocks_needed(cfg),
        max_num_seqs=max(cfg.num_prompts, 1),
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    comms = {}
    for name in cfg.run_order:
        comm_cfg = CommConfig(
            codec=name,
            accuracy=cfg.accuracy,
            zstd_level=cfg.zstd_level,
            small_message_bytes=cfg.small_message_bytes,
        )
        comms[name] = Communicator.start(cfg.rank, cfg.world, comm_cfg, dtype=model.dtype)
    mc = model.config
    prompts = make_prompts(cfg.num_prompts, cfg.prompt_len, cfg.prompt_seed, mc.bos_token_id)
    timing_prompt = make_prompts(1, cfg.timing_tokens, cfg.prompt_seed + 1, mc.bos_token_id)[0]
    itemsize = torch.tensor([], dtype=model.dtype).element_size()
    results: dict[str, dict] = {}
    ref: dict[str, object] = {}
    try:
        with torch.inference_mode():
            for name in cfg.run_order:
                comm = comms[name]
                group.comm = comm
                if cfg.rank == 0:
                    results[name] = _lead_codec(
                        name, comm, group, channel, model, engine_cfg, prompts,
                        timing_prompt, cfg, ref, itemsize,
                    )  # fmt: skip
                else:
                    runner = ModelRunner(model, engine_cfg, engine_cfg.num_kv_blocks)
                    run_worker(runner, channel)
                    if cfg.timing_tokens:
                        default = group.overlap
                        for _ in range(cfg.timing_reps + 1):
                            for k in cfg.overlap_chunks:
                                group.overlap = overlap_policy(k)
                                _, plan = channel.recv()
                                runner.run(plan)
                        group.overlap = default
    finally:
        dist.destroy_process_group()
    if cfg.rank != 0:
        return None
    for name in cfg.run_order:
        acc = compare(ref["logits"], ref[f"logits:{name}"], ref["tokens"], ref[f"tokens:{name}"])  # type: ignore[arg-type]
        results[name]["accuracy"] = acc
    link = next((c.link for c in comms.values() if c.link is not None), None)
    return {
        "meta": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("rank", "out")},
            "itemsize": itemsize,
            "overlap_policy": asdict(group.overlap),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "link_probe": None
        if link is None
        else {
            "alpha_us": link.alpha_s * 1e6,
            "beta_mbit_s": link.beta_bytes_per_s * 8 / 1e6,
            "decision_table": link.decision_table(
                [n * mc.hidden_size * itemsize for n in (1, 16, 64, 128, 256, 512, 2048)],
                itemsize,
            ),
        },
        "codecs": results,
    }


def _lead_codec(
    name: str,
    comm: Communicator,
    group: ParallelGroup,
    channel: PlanChannel,
    model: LlamaForCausalLM,
    engine_cfg: EngineConfig,
    prompts: list[list[int]],
    timing_prompt: list[int],
    cfg: HarnessConfig,
    ref: dict[str, object],
    itemsize: int,
) -> dict:
    """Rank 0's phases for one codec (see the module docstring)."""
    from serve.engine.engine import LLMEngine

    comm.stats.reset()
    engine = LLMEngine(model, engine_cfg, channel)
    t0 = time.perf_counter()
    tokens = generate(engine, prompts, cfg.max_tokens)
    gen_s = time.perf_counter() - t0
    if name == REFERENCE:
        ref["tokens"] = tokens
    t0 = time.perf_counter()
    logits = teacher_force(engine.runner, channel, prompts, ref["tokens"], cfg)
    tf_s = time.perf_counter() - t0
    if name == REFERENCE:
        ref["logits"] = logits
    ref[f"tokens:{name}"] = tokens
    ref[f"logits:{name}"] = logits
    snapshot = comm.stats.snapshot()
    channel.stop()
    out: dict = {
        "generate_s": gen_s,
        "teacher_force_s": tf_s,
        "comm": snapshot,
        "coded": coded_bytes(snapshot, itemsize),
    }
    if cfg.timing_tokens:
        from serve.model.overlap import link_bound

        comm.stats.reset()
        half = cfg.timing_tokens // 2 * model.config.hidden_size
        out["timing"] = {
            "tokens": cfg.timing_tokens,
            "by_chunks": time_steps(engine.runner, group, channel, cfg, timing_prompt),
            "coded": coded_bytes(comm.stats.snapshot(), itemsize),
            # Whether the default policy would cut this step in two.
            "policy_overlaps": link_bound(group, half, model.dtype),
        }
    logger.info(
        "codec %s: generate %.1f s, teacher forcing %.1f s, %s",
        name,
        gen_s,
        tf_s,
        {k: round(v["wire_vs_bf16"], 3) for k, v in out["coded"].items()},
    )
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if cfg.rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{cfg.rank} %(name)s %(levelname)s %(message)s",
    )
    result = run(cfg)
    if result is not None and cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
