"""Turns a SchedulerOutput into tensors (a StepPlan), runs the model on the
paged KV cache and samples. In a TP group the leader sends each plan to the
other ranks (serve.dist.group.PlanChannel) before running it; they run the
same forward, so the row- and vocab-parallel all-reduces meet."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from serve.config import EngineConfig
from serve.dist.group import PlanChannel
from serve.dist.plan import StepPlan
from serve.engine.request import Request
from serve.engine.sampler import sample
from serve.engine.scheduler import SchedulerOutput
from serve.model.attention import AttentionMetadata, PrefillChunk
from serve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled: dict[str, int]


def kv_block_bytes(model: LlamaForCausalLM, block_size: int) -> int:
    """Bytes one KV block takes on this rank, over all layers."""
    attn = model.model.layers[0].self_attn
    elem = torch.tensor([], dtype=model.dtype).element_size()
    per_layer = 2 * block_size * attn.num_kv_heads * attn.head_dim * elem
    return per_layer * len(model.model.layers)


def num_kv_blocks(model: LlamaForCausalLM, config: EngineConfig) -> int:
    """Blocks in the pool: configured, or as many as kv_cache_bytes holds
    (the same on every rank of a TP group, whose KV heads split evenly)."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    return max(config.kv_cache_bytes // kv_block_bytes(model, config.block_size), 1)


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        num_blocks: int,
        channel: PlanChannel | None = None,
    ) -> None:
        self.model = model
        self.channel = channel
        self.block_size = config.block_size
        attn = model.model.layers[0].self_attn
        shape = (2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        # Zeroed: padded attention reads unused slots (masked, but NaN * 0 is NaN).
        self.kv_caches = [torch.zeros(shape, dtype=model.dtype) for _ in model.model.layers]

    def prepare(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> StepPlan:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        samples: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        for req in out.decodes:
            p = req.num_computed_tokens
            table = block_tables[req.request_id]
            ids.append(req.token_at(p))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            samples.append(len(ids) - 1)
            ctx_lens.append(p + 1)
            tables.append(table)
        width = max((len(t) for t in tables), default=1)
        decode_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        chunks: list[PrefillChunk] = []
        for req, n in out.prefills:
            start = req.num_computed_tokens
            table = block_tables[req.request_id]
            chunks.append(
                PrefillChunk(len(ids), n, start + n, torch.tensor(table, dtype=torch.long))
            )
            ids.extend(req.tokens(start, start + n))
            pos.extend(range(start, start + n))
            slots.extend(table[q // bs] * bs + q % bs for q in range(start, start + n))
            if start + n == req.num_tokens:
                samples.append(len(ids) - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decode_tokens=len(out.decodes),
            decode_block_tables=decode_tables.view(len(tables), width),
            decode_context_lens=torch.tensor(ctx_lens, dtype=torch.long),
            prefills=chunks,
            block_size=bs,
        )
        return StepPlan(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long),
            meta=meta,
            sample_indices=torch.tensor(samples, dtype=torch.long),
        )

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits [num_samples, vocab] (float32) for the plan's sampled rows."""
        hidden = self.model(plan.input_ids, plan.positions, self.kv_caches, plan.meta)
        return self.model.compute_logits(hidden[plan.sample_indices])

    def execute(
        self, out: SchedulerOutput, block_tables: dict[str, list[int]]
    ) -> ModelRunnerOutput:
        plan = self.prepare(out, block_tables)
        if self.channel is not None:
            self.channel.send_plan(plan)
        logits = self.run(plan)
        reqs: list[Request] = list(out.decodes) + [
            r for r, n in out.prefills if r.num_computed_tokens + n == r.num_tokens
        ]
        tokens = sample(
            logits,
            [r.sampling for r in reqs],
            [r.seed for r in reqs],
            [r.num_output_tokens for r in reqs],
        )
        return ModelRunnerOutput({r.request_id: t for r, t in zip(reqs, tokens, strict=True)})

    def idle(self) -> None:
        """Called when a step has nothing to run: keeps the other ranks alive."""
        if self.channel is not None:
            self.channel.heartbeat()

    def close(self) -> None:
        """Releases the other ranks of the group."""
        if self.channel is not None:
            self.channel.stop()
            self.channel = None
