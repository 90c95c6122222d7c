"""Micro-chunked forward passes: the all-reduce of one piece of a step runs
while the next piece computes.

A large step (a long prefill) is cut into pieces of consecutive tokens. Layer
by layer, every piece's attention runs in token order (a later piece reads the
keys and values an earlier piece of the same sequence has just written), its
partial output goes to the comm thread (ParallelGroup.all_reduce_async), and
the next piece computes meanwhile; then the MLPs, the same way:

    layer l:  attn(p0) attn(p1) | mlp(p0) mlp(p1) | attn(p0) ...
    comm:          AR(p0)  AR(p1)     AR(p0)  AR(p1)

Every rank cuts the same step at the same tokens and submits the same
all-reduces in the same order, so the collectives meet as in the plain path.
Rows are computed by the same operations as on the plain path, but the
matmuls and attention of a piece see fewer rows, so the results may differ from
the plain path in the last bits: the policy keeps it off unless configured.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from serve.dist.group import ParallelGroup
from serve.model.attention import AttentionMetadata, PrefillChunk
from serve.model.layers import linear

if TYPE_CHECKING:
    from serve.model.llama import LlamaForCausalLM, LlamaModel

logger = logging.getLogger(__name__)


def micro_chunk_bounds(
    meta: AttentionMetadata,
    num_tokens: int,
    group: ParallelGroup,
    hidden: int,
    dtype: torch.dtype,
) -> list[int] | None:
    """Token offsets [0, b1, ..., num_tokens] cutting the step into pieces
    under the group's overlap policy, or None to run it whole. Decode tokens
    (at the front of a step) all stay in the first piece."""
    policy = group.overlap
    if group.size == 1 or not policy.enabled or num_tokens < policy.min_tokens:
        return None
    k = min(policy.num_chunks, num_tokens // max(policy.min_chunk_tokens, 1))
    if k < 2:
        return None
    bounds = [round(num_tokens * j / k) for j in range(k + 1)]
    if bounds[1] < meta.num_decode_tokens:
        return None
    piece, whole = bounds[1] * hidden, num_tokens * hidden
    if exact_beats_coding(group, piece, whole, k, num_tokens, dtype):
        return bounds  # the step goes uncompressed (forward_overlapped)
    if _codec(group, piece, dtype) != _codec(group, whole, dtype):
        return None  # smaller messages would change codec (e.g. fall under a size threshold)
    if policy.link_bound_only and not link_bound(group, piece, dtype):
        return None
    return bounds


def exact_beats_coding(
    group: ParallelGroup, piece: int, whole: int, k: int, num_tokens: int, dtype: torch.dtype
) -> bool:
    """Whether a step that `auto` would send coded (no cut: the codec's CPU work
    would compete with the next piece's matmuls) is predicted faster uncompressed
    and cut into k pieces, its link time hidden behind compute. Per all-reduce,
    with C the compute between two all-reduces (half a layer), x one piece's
    uncompressed exchange and t the coded exchange of the whole message:

        coded: C + t            cut, uncompressed: max(C, k * x)

    (the pieces' exchanges run beside the next pieces' compute: the link is
    hidden while k * x <= C, else it sets the pace; filling and draining that
    pipeline happens once a step, not per all-reduce). Every rank holds the
    same measured numbers, so every rank decides alike."""
    comm = group.comm
    link = getattr(comm, "link", None)
    per_token = group.overlap.layer_s_per_token
    if link is None or per_token <= 0 or getattr(comm, "config", None) is None:
        return False
    if comm.config.codec != "auto":  # type: ignore[union-attr]
        return False
    key = (piece, whole, k, num_tokens, dtype)
    decisions = group.exact_decisions
    known = decisions.get(key)
    if known is not None:
        return known
    whole_codec = _codec(group, whole, dtype)
    decision = False
    if whole_codec != "none":
        itemsize = torch.empty((), dtype=dtype).element_size()
        compute = per_token * num_tokens / 2
        coded = compute + link.predict(whole_codec, whole * itemsize, itemsize)
        x = link.predict("none", piece * itemsize, itemsize)
        cut = max(compute, k * x)
        decision = cut < coded
        logger.info(
            "auto, %d-token steps: %s (predicted per all-reduce: %s %.2f ms, "
            "uncompressed in %d pieces %.2f ms)",
            num_tokens,
            "uncompressed, cut" if decision else whole_codec,
            whole_codec,
            coded * 1e3,
            k,
            cut * 1e3,
        )
    if len(decisions) < 4096:
        decisions[key] = decision
    return decision


def measure_layer_s_per_token(model: LlamaForCausalLM, tokens: int, reps: int = 3) -> float:
    """Seconds per token of one decoder layer's matmuls on this rank (its slice of
    q/k/v, o, gate/up and down) for a step of `tokens` tokens: the compute an
    all-reduce can hide behind. Attention itself is left out (a few percent of a
    prefill step of this size)."""
    layer = model.model.layers[0]
    attn = layer.self_attn
    gen = torch.Generator().manual_seed(0)
    hidden = attn.qkv_weight.shape[1]
    x = (torch.randn(tokens, hidden, generator=gen) * 0.02).to(model.dtype)
    o_in = (torch.randn(tokens, attn.num_heads * attn.head_dim, generator=gen) * 0.02).to(
        model.dtype
    )

    def run() -> None:
        linear(x, attn.qkv_weight, attn.qkv_bias)
        attn.o_proj.partial(o_in)
        layer.mlp.partial(x)

    best = float("inf")
    with torch.inference_mode():
        run()  # warm-up
        for _ in range(reps):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return best / tokens


def _codec(group: ParallelGroup, numel: int, dtype: torch.dtype) -> str:
    """The codec an all-reduce of numel elements takes ("none": exact path)."""
    spec_for = getattr(group.comm, "spec_for", None)
    if spec_for is None:
        return "none"
    # Only the size and dtype are read: a zero-stride view allocates nothing.
    spec = spec_for(torch.empty((), dtype=dtype).expand(numel))
    return "none" if spec is None else spec.label


def link_bound(group: ParallelGroup, numel: int, dtype: torch.dtype) -> bool:
    """Whether an all-reduce of numel elements mostly waits on the link: when
    it goes uncompressed. A coded one is counted as CPU work, since encoding
    and decoding share the cores with the matmuls of the next piece (measured:
    cutting such steps lost 11-13% at 1000 Mbit/s, gained up to 18% at 100)."""
    return _codec(group, numel, dtype) == "none"


def split_metadata(meta: AttentionMetadata, start: int, stop: int) -> AttentionMetadata:
    """The metadata of the step's tokens [start, stop): decodes only in a piece
    that starts at 0 (and holds them all), prefill chunks cut at the piece's
    edges with their context shortened to the tokens up to the cut."""
    nd = meta.num_decode_tokens
    if start > 0:
        nd = 0
    elif stop < nd:
        raise ValueError(f"a piece [0, {stop}) must hold all {nd} decode tokens")
    prefills = []
    for c in meta.prefills:
        lo, hi = max(c.start, start), min(c.start + c.num_tokens, stop)
        if lo >= hi:
            continue
        after = c.start + c.num_tokens - hi  # tokens of the chunk past this piece
        prefills.append(PrefillChunk(lo - start, hi - lo, c.context_len - after, c.block_table))
    width = meta.decode_block_tables.shape[1] if meta.decode_block_tables.dim() == 2 else 0
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[start:stop],
        num_decode_tokens=nd,
        decode_block_tables=meta.decode_block_tables[:nd].reshape(nd, width),
        decode_context_lens=meta.decode_context_lens[:nd],
        prefills=prefills,
        block_size=meta.block_size,
    )


def forward_overlapped(
    model: LlamaModel,
    input_ids: torch.Tensor,  # [num_tokens]
    positions: torch.Tensor,  # [num_tokens]
    kv_caches: list[torch.Tensor],
    meta: AttentionMetadata,
    bounds: list[int],
) -> torch.Tensor:
    """LlamaModel.forward, piece by piece with the all-reduces of one piece
    overlapping the compute of the next. Returns [num_tokens, hidden]."""
    group = model.group
    w = model.embed_tokens.weight  # [vocab_local, hidden]
    n, hidden = input_ids.numel(), w.shape[1]
    exact = exact_beats_coding(group, bounds[1] * hidden, n * hidden, len(bounds) - 1, n, w.dtype)
    comm = group.comm
    if exact:
        comm.exact_only = True  # type: ignore[union-attr]
    try:
        return _forward_pieces(model, input_ids, positions, kv_caches, meta, bounds)
    finally:
        if exact:
            comm.exact_only = False  # type: ignore[union-attr]


def _forward_pieces(
    model: LlamaModel,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    kv_caches: list[torch.Tensor],
    meta: AttentionMetadata,
    bounds: list[int],
) -> torch.Tensor:
    group = model.group
    spans = list(zip(bounds, bounds[1:], strict=False))
    metas = [split_metadata(meta, a, b) for a, b in spans]
    cos, sin = model.rotary.lookup(positions)
    ropes = [(cos[a:b], sin[a:b]) for a, b in spans]
    # Per piece: the residual stream (None until the embedding lands) and the
    # all-reduce in flight that is added to it next.
    xs: list[torch.Tensor | None] = [None] * len(spans)
    pending: list[Future[torch.Tensor]] = [
        group.all_reduce_async(model.embed_tokens.partial(input_ids[a:b])) for a, b in spans
    ]

    def land(j: int) -> torch.Tensor:
        r = pending[j].result()  # [piece, hidden]
        x = xs[j]
        xs[j] = r if x is None else x + r
        return xs[j]  # type: ignore[return-value]

    for index, (layer, kv_cache) in enumerate(zip(model.layers, kv_caches, strict=True)):
        for j in range(len(spans)):
            x = land(j)
            h = layer.self_attn.partial(layer.input_layernorm(x), ropes[j], kv_cache, metas[j])
            pending[j] = group.all_reduce_async(h)
        for j in range(len(spans)):
            h = layer.mlp.partial(layer.post_attention_layernorm(land(j)))
            pending[j] = group.all_reduce_async(h)
        if model.after_layer is not None:
            model.after_layer(index)  # every piece's KV of this layer is written
    out = [land(j) for j in range(len(spans))]
    return model.norm(torch.cat(out))
