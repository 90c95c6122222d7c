"""Setting up one rank of a TP group, and the loop of the non-leader ranks."""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from serve.comm.collectives import CommConfig, Communicator
from serve.comm.sockets import local_address
from serve.config import ShardConfig
from serve.dist.group import (
    PLAN_KV_READ,
    PLAN_KV_WRITE,
    PLAN_STEP,
    PLAN_STOP,
    KvOp,
    OverlapPolicy,
    ParallelGroup,
    PlanChannel,
    init_process_group,
)
from serve.dist.plan import PlanLimits, StepPlan
from serve.engine.runner import ModelRunner, num_kv_blocks
from serve.model.llama import LlamaForCausalLM
from serve.model.loader import load_model
from serve.model.overlap import measure_layer_s_per_token

logger = logging.getLogger(__name__)


def load_rank(config: ShardConfig) -> tuple[LlamaForCausalLM, PlanChannel | None]:
    """Loads this rank's slice of the weights, then joins the group (so slow
    loading does not eat into the collectives' timeout)."""
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    tp = config.tp
    group = ParallelGroup(tp.rank, tp.size)
    model = load_model(config.model, group=group, dtype=config.dtype, seed=config.seed)
    if tp.size == 1:
        return model, None
    init_process_group(tp.rank, tp.size, tp.master_addr, tp.master_port, tp.timeout_s)
    comm_config = CommConfig(
        codec=tp.comm_codec,
        accuracy=tp.comm_accuracy,
        zstd_level=tp.comm_zstd_level,
        transport=tp.resolved_transport,
        bind_host=local_address(tp.master_addr, tp.master_port),
        timeout_s=tp.timeout_s,
    )
    group.comm = Communicator.start(tp.rank, tp.size, comm_config, dtype=model.dtype)
    if tp.overlap_chunks > 1:
        group.overlap = OverlapPolicy(tp.overlap_min_tokens, tp.overlap_chunks)
    check_same_overlap(group)
    if group.overlap.enabled and tp.comm_codec == "auto":
        per_token = slowest_rank(group, measure_layer_s_per_token(model, group.overlap.min_tokens))
        group.overlap = dataclasses.replace(group.overlap, layer_s_per_token=per_token)
        logger.info("layer compute %.1f us per prompt token (slowest rank)", per_token * 1e6)
    return model, PlanChannel(tp.rank, tp.size)


def slowest_rank(group: ParallelGroup, seconds: float) -> float:
    """The largest of every rank's `seconds` (the same number on every rank)."""
    mine = torch.tensor([[round(seconds * 1e9)]], dtype=torch.int64)
    every = group.comm.all_gather(mine, dim=0)  # type: ignore[union-attr]
    return int(every.max()) / 1e9


def check_same_overlap(group: ParallelGroup) -> None:
    """Ranks that cut steps differently would issue different all-reduces:
    refuse to start unless every rank holds the same overlap policy."""
    p = group.overlap
    policy = [p.min_tokens, p.num_chunks, p.link_bound_only] if p.enabled else [0, 0, 0]
    mine = torch.tensor([policy], dtype=torch.int64)
    every = group.comm.all_gather(mine, dim=0)  # type: ignore[union-attr]
    if not bool((every == mine).all()):
        raise ValueError(
            f"TP ranks disagree on the overlap policy (min tokens, chunks, link-bound only: "
            f"{every.tolist()}); pass the same --tp-overlap-chunks to every rank"
        )


def run_worker(runner: ModelRunner, channel: PlanChannel) -> None:
    """Runs the leader's plans until it sends stop; a dead leader ends the loop
    through the process group's timeout (an exception)."""
    num_steps = 0
    while True:
        kind, plan = channel.recv()
        if kind == PLAN_STOP:
            logger.info("rank %d stopping after %d steps", channel.rank, num_steps)
            return
        if kind == PLAN_STEP and isinstance(plan, StepPlan):
            runner.run(plan)
            num_steps += 1
        elif kind in (PLAN_KV_READ, PLAN_KV_WRITE) and isinstance(plan, KvOp):
            runner.serve_kv_op(kind, plan, channel)


def serve_worker(config: ShardConfig) -> int:
    """The whole life of a rank > 0."""
    model, channel = load_rank(config)
    if channel is None:
        raise ValueError("serve_worker needs a TP group of size > 1")
    num_blocks = num_kv_blocks(model, config.engine)
    runner = ModelRunner(model, config.engine, num_blocks, channel)
    max_positions = model.config.max_position_embeddings
    channel.limits = PlanLimits(
        vocab_size=model.config.vocab_size,
        num_blocks=num_blocks,
        block_size=config.engine.block_size,
        max_model_len=min(config.engine.max_model_len or max_positions, max_positions),
        num_layers=model.config.num_layers,
    )
    try:
        run_worker(runner, channel)
    finally:
        dist.destroy_process_group()
    return 0
