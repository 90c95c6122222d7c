"""Turns a SchedulerOutput into tensors (a StepPlan), runs the model on the
paged KV cache and samples. In a TP group the leader sends each plan to the
other ranks (serve.dist.group.PlanChannel) before running it; they run the
same forward, so the row- and vocab-parallel all-reduces meet."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from serve.config import EngineConfig
from serve.dist.group import PLAN_KV_READ, KvOp, ParallelGroup, PlanChannel
from serve.dist.plan import PlanTap, StepPlan
from serve.engine.request import Request
from serve.engine.sampler import sample
from serve.engine.scheduler import SchedulerOutput
from serve.model.attention import AttentionMetadata, PrefillChunk, write_kv
from serve.model.llama import LlamaForCausalLM, kv_head_piece

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled: dict[str, int]


# (layer, first token, keys [n, kv_heads, head_dim], values [n, kv_heads, head_dim])
KvSink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class KvTap:
    """Receives a request's keys and values layer by layer, right after each layer
    of a step has written them (disaggregated prefill streams them out while the
    next layers compute). Called on the engine thread with copies of every KV
    head: a TP leader gathers the other ranks' heads after each layer."""

    sink: KvSink
    # Tokens already handed to the sink (in every layer).
    num_sent: int = 0


def kv_slots(block_table: list[int], start: int, stop: int, block_size: int) -> torch.Tensor:
    """Cache slots of tokens [start, stop) of a sequence: [stop - start] int64."""
    pos = torch.arange(start, stop)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


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
        # A TP group's plan channel: the leader sends plans and KV ops on it, and
        # every rank hands the leader its heads of tapped tokens over it.
        self.channel = channel
        self.block_size = config.block_size
        attn = model.model.layers[0].self_attn
        shape = (2, num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        # Zeroed: padded attention reads unused slots (masked, but NaN * 0 is NaN).
        self.kv_caches = [torch.zeros(shape, dtype=model.dtype) for _ in model.model.layers]
        cfg, group = model.config, model.group
        self.num_kv_heads = cfg.num_kv_heads  # every head, whatever the TP size
        # This rank's KV heads are piece `index` of `count` ([index * local, ...));
        # with fewer KV heads than ranks several ranks hold the same piece.
        self._kv_piece = kv_head_piece(cfg.num_kv_heads, group)
        pieces = [kv_head_piece(cfg.num_kv_heads, ParallelGroup(r, group.size))[0]
                  for r in range(group.size)]  # fmt: skip
        # The first rank holding each piece, in piece order (whose heads a gather takes).
        self._piece_ranks = [pieces.index(i) for i in range(self._kv_piece[1])]
        self.taps: dict[str, KvTap] = {}
        # This step's taps (the leader's, in the order of its plan's taps).
        self._step_taps: list[KvTap] = []

    # -- KV in and out (see serve.shard.kv_transfer) ----------------------------------

    def read_kv(
        self, layer: int, block_table: list[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of tokens [start, stop): [n, kv_heads, head_dim]
        each. Safe from any thread for tokens whose KV is written and whose blocks are
        held (written KV never changes while its blocks are held)."""
        cache = self.kv_caches[layer]  # [2, blocks, block_size, kv_heads, head_dim]
        _, num_blocks, bs, heads, dim = cache.shape
        # Whole blocks are copied (a block is contiguous), then the tokens cut out.
        first, last = start // bs, -(-stop // bs)
        blocks = torch.tensor(block_table[first:last], dtype=torch.long)
        kv = cache.view(2, num_blocks, bs * heads * dim).index_select(1, blocks)
        kv = kv.view(2, (last - first) * bs, heads, dim)[:, start - first * bs : stop - first * bs]
        return kv[0], kv[1]  # [n, kv_heads, head_dim] each

    def write_kv(
        self, layer: int, block_table: list[int], start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Stores keys and values [n, kv_heads, head_dim] of tokens [start, start + n)
        into blocks that no scheduled request reads yet (an import being staged)."""
        cache = self.kv_caches[layer]
        slots = kv_slots(block_table, start, start + k.shape[0], self.block_size)
        write_kv(cache, k.to(cache.dtype), v.to(cache.dtype), slots)

    def read_kv_all(
        self, layer: int, block_table: list[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """read_kv with every KV head, [n, num_kv_heads, head_dim] each: a TP leader
        gathers the other ranks' heads through the plan channel, so it must run on
        the engine thread, between steps."""
        k, v = self.read_kv(layer, block_table, start, stop)
        if self.channel is None:
            return k, v
        pieces = self.channel.kv_read(
            KvOp(layer, start, stop, list(block_table)), torch.stack((k, v))
        )
        return self._every_head(pieces)

    def _every_head(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every KV head from the ranks' pieces ([2, n, local heads,
        head_dim] each, in rank order): each head taken from one rank holding it."""
        kv = torch.cat([pieces[r] for r in self._piece_ranks], dim=2)  # [2, n, heads, head_dim]
        return kv[0], kv[1]

    def write_kv_all(
        self, layer: int, block_table: list[int], start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """write_kv of every KV head ([n, num_kv_heads, head_dim] each); each rank of a
        TP group keeps its own heads (engine thread only, between steps)."""
        if self.channel is None:
            self.write_kv(layer, block_table, start, k, v)
            return
        cache = self.kv_caches[layer]
        kv = torch.stack((k, v)).to(cache.dtype)
        op = KvOp(layer, start, start + k.shape[0], list(block_table))
        self.channel.kv_write(op, kv)
        self._write_own_heads(op, kv)

    def _write_own_heads(self, op: KvOp, kv: torch.Tensor) -> None:
        local = self.kv_caches[op.layer].shape[3]
        own = kv[:, :, self._kv_piece[0] * local : (self._kv_piece[0] + 1) * local]
        self.write_kv(op.layer, op.block_table, op.start, own[0], own[1])

    def serve_kv_op(self, kind: int, op: KvOp, channel: PlanChannel) -> None:
        """A non-leader rank's part of the leader's read_kv_all / write_kv_all."""
        if kind == PLAN_KV_READ:
            k, v = self.read_kv(op.layer, op.block_table, op.start, op.stop)
            channel.kv_read_reply(torch.stack((k, v)))
            return
        cache = self.kv_caches[op.layer]
        kv = channel.kv_write_recv(op, self.num_kv_heads, cache.shape[4], cache.dtype)
        self._write_own_heads(op, kv)

    def add_tap(self, request_id: str, sink: KvSink) -> None:
        self.taps[request_id] = KvTap(sink)

    def remove_tap(self, request_id: str) -> None:
        self.taps.pop(request_id, None)

    def _plan_taps(self, out: SchedulerOutput) -> list[PlanTap]:
        """The step's taps, rows in plan order (decodes, then prefill chunks): the
        tokens each tapped request's sink has not had yet, up to the step's end. A
        request preempted after some of its KV went out recomputes it from an
        earlier token: nothing goes out again until it passes what was sent."""
        self._step_taps = []
        taps: list[PlanTap] = []
        rows = [(r, 1) for r in out.decodes] + list(out.prefills)
        for row, (req, n) in enumerate(rows):
            tap = self.taps.get(req.request_id)
            stop = req.num_computed_tokens + n
            if tap is not None and stop > tap.num_sent:
                taps.append(PlanTap(row, tap.num_sent, stop))
                self._step_taps.append(tap)
        return taps

    def _tap_layers(self, plan: StepPlan) -> Callable[[int], None]:
        """What every rank does after each layer of a step with taps: a TP=1 runner
        hands its KV of the tapped tokens to the sinks; in a TP group each rank
        sends its heads to the leader, which hands every head to the sinks."""
        tables = [plan.tap_table(t) for t in plan.taps]
        leader = self.model.group.is_leader

        def after_layer(index: int) -> None:
            for i, (tap, table) in enumerate(zip(plan.taps, tables, strict=True)):
                k, v = self.read_kv(index, table, tap.start, tap.stop)
                if self.channel is not None:
                    if not leader:
                        self.channel.tap_send(torch.stack((k, v)))
                        continue
                    k, v = self._every_head(self.channel.tap_gather(torch.stack((k, v))))
                self._step_taps[i].sink(index, tap.start, k, v)

        return after_layer

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
        model = self.model.model
        model.after_layer = self._tap_layers(plan) if plan.taps else None
        try:
            hidden = self.model(plan.input_ids, plan.positions, self.kv_caches, plan.meta)
        finally:
            model.after_layer = None
        return self.model.compute_logits(hidden[plan.sample_indices])

    def execute(
        self, out: SchedulerOutput, block_tables: dict[str, list[int]]
    ) -> ModelRunnerOutput:
        plan = self.prepare(out, block_tables)
        if self.taps:
            plan.taps = self._plan_taps(out)
        if self.channel is not None:
            self.channel.send_plan(plan)
        try:
            logits = self.run(plan)
            for tap, sent in zip(self._step_taps, plan.taps, strict=True):
                tap.num_sent = sent.stop
        finally:
            self._step_taps = []
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
