"""Micro-chunked steps (serve.model.overlap): the pieces' forward must give
the whole step's hidden states, decodes, chunked prefills and cached prefixes
included, and the policy must cut only where it is told to."""

from __future__ import annotations

import copy

import torch

from serve.comm.codecs import CodecSpec
from serve.comm.collectives import CommConfig
from serve.comm.linkmodel import CodecCost, LinkModel
from serve.dist.group import OverlapPolicy, ParallelGroup
from serve.model.attention import AttentionMetadata, PrefillChunk
from serve.model.loader import load_model
from serve.model.overlap import (
    _codec,
    exact_beats_coding,
    link_bound,
    micro_chunk_bounds,
    split_metadata,
)
from tests.fixtures.paged import PagedStepper


class Local:
    """Stands in for the other rank: all-reduce is the identity, so a size-2
    group runs its real code path (pieces, comm thread) in one process."""

    def __init__(self, spec: CodecSpec | None = None, min_bytes: int = 0) -> None:
        self.spec = spec
        self.min_bytes = min_bytes  # smaller messages take the exact path
        self.calls = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.clone()

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return torch.cat([x, x], dim=dim)

    def spec_for(self, x: torch.Tensor) -> CodecSpec | None:
        return self.spec if x.numel() * x.element_size() >= self.min_bytes else None


FORCED = OverlapPolicy(min_tokens=1, num_chunks=3, min_chunk_tokens=1, link_bound_only=False)


def _meta(nd: int, prefills: list[PrefillChunk], num_tokens: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.arange(num_tokens),
        num_decode_tokens=nd,
        decode_block_tables=torch.zeros(nd, 2, dtype=torch.long),
        decode_context_lens=torch.full((nd,), 5, dtype=torch.long),
        prefills=prefills,
        block_size=4,
    )


def test_split_metadata_cuts_chunks_and_keeps_decodes_in_front() -> None:
    table = torch.arange(20)
    # 2 decodes, then a chunk of 10 tokens after 6 cached ones, then a fresh 8.
    meta = _meta(2, [PrefillChunk(2, 10, 16, table), PrefillChunk(12, 8, 8, table)], 20)
    first, second = split_metadata(meta, 0, 7), split_metadata(meta, 7, 20)
    assert first.num_decode_tokens == 2 and second.num_decode_tokens == 0
    assert [(c.start, c.num_tokens, c.context_len) for c in first.prefills] == [(2, 5, 11)]
    assert [(c.start, c.num_tokens, c.context_len) for c in second.prefills] == [
        (0, 5, 16),
        (5, 8, 8),
    ]
    assert torch.equal(second.slot_mapping, torch.arange(7, 20))
    assert second.decode_block_tables.shape == (0, 2)


def test_bounds_follow_the_policy() -> None:
    group = ParallelGroup(0, 2, Local(), OverlapPolicy(min_tokens=256, num_chunks=2))
    meta = _meta(0, [], 512)
    assert micro_chunk_bounds(meta, 512, group, 64, torch.float32) == [0, 256, 512]
    assert micro_chunk_bounds(meta, 255, group, 64, torch.float32) is None
    # Decodes never straddle a cut.
    assert micro_chunk_bounds(_meta(300, [], 512), 512, group, 64, torch.float32) is None
    # A group of one and a policy that is off never cut.
    assert micro_chunk_bounds(meta, 512, ParallelGroup.single(), 64, torch.float32) is None
    off = ParallelGroup(0, 2, Local(), OverlapPolicy())
    assert micro_chunk_bounds(meta, 512, off, 64, torch.float32) is None
    # A codec on the pieces is CPU work beside the next piece's matmuls: no cut.
    coded = ParallelGroup(0, 2, Local(CodecSpec.parse("int8")), group.overlap)
    assert not link_bound(coded, 256 * 64, torch.float32)
    assert micro_chunk_bounds(meta, 512, coded, 64, torch.float32) is None
    assert link_bound(group, 256 * 64, torch.float32)
    # Pieces that would fall under the codec's size threshold (and go uncompressed
    # where the whole step is coded) are not cut, even when cutting is forced.
    forced = OverlapPolicy(min_tokens=1, num_chunks=2, min_chunk_tokens=1, link_bound_only=False)
    spec = CodecSpec.parse("int8")
    small = ParallelGroup(0, 2, Local(spec, min_bytes=300 * 64 * 4), forced)
    assert micro_chunk_bounds(meta, 512, small, 64, torch.float32) is None
    large = ParallelGroup(0, 2, Local(spec, min_bytes=200 * 64 * 4), forced)
    assert micro_chunk_bounds(meta, 512, large, 64, torch.float32) == [0, 256, 512]


def test_pieces_give_the_whole_steps_hidden_states() -> None:
    comm = Local()
    group = ParallelGroup(0, 2, comm)
    net = load_model("tiny", group=group)
    stepper = PagedStepper(net, num_blocks=256, block_size=4, seed=3)
    gen = torch.Generator().manual_seed(5)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 264, (n,), generator=gen).tolist()

    # Fill some context: seq 0 fully, seq 1 partly (chunked prefill).
    stepper.step(prefills=[(0, ids(30)), (1, ids(90))])
    step = stepper.prepare(decodes=[(0, 7)], prefills=[(1, ids(110)), (2, ids(150))])
    caches = copy.deepcopy(stepper.kv_caches)
    per_step = 1 + 2 * net.config.num_layers  # the embedding, then two per layer
    layers_done: list[tuple[int, int]] = []  # (layer, all-reduces so far) per call
    net.model.after_layer = lambda index: layers_done.append((index, comm.calls))
    with torch.inference_mode():
        comm.calls = 0
        whole = net(step.input_ids, step.positions, stepper.kv_caches, step.meta)
        assert comm.calls == per_step
        # after_layer runs as each layer ends, on both paths (taps stream from it).
        assert layers_done == [(i, 3 + 2 * i) for i in range(net.config.num_layers)]
        group.overlap = FORCED
        comm.calls = 0
        layers_done.clear()
        pieces = net(step.input_ids, step.positions, caches, step.meta)
        assert comm.calls == FORCED.num_chunks * per_step
        # Layer by layer, once every piece's attention (hence its KV) has landed; the
        # MLPs' all-reduces may still be in flight.
        k = FORCED.num_chunks
        assert [i for i, _ in layers_done] == list(range(net.config.num_layers))
        assert all(k * (2 + 2 * i) <= calls <= k * (3 + 2 * i) for i, calls in layers_done)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches, stepper.kv_caches, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class AutoLocal(Local):
    """A stand-in whose codec `auto` picks from a link model, honouring exact_only;
    records whether each all-reduce was forced exact."""

    def __init__(self, link: LinkModel) -> None:
        super().__init__()
        self.link = link
        self.config = CommConfig(codec="auto", accuracy="lossy")
        self.exact_only = False
        self.forced: list[bool] = []

    def spec_for(self, x: torch.Tensor) -> CodecSpec | None:
        if self.exact_only:
            return None
        spec = self.link.choose(x.numel() * x.element_size(), "lossy", x.element_size())
        return None if spec.name == "none" else spec

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.forced.append(self.exact_only)
        return super().all_reduce(x)


INT8_COST = CodecCost("int8", 20e-6, 2e-9, 10e-6, 1e-9, 0.516)


def _auto_group(mbit: float, layer_s_per_token: float) -> tuple[ParallelGroup, AutoLocal]:
    link = LinkModel(50e-6, mbit * 1e6 / 8, itemsize=4, costs=(CodecCost("none"), INT8_COST))
    comm = AutoLocal(link)
    policy = OverlapPolicy(min_tokens=256, num_chunks=2, layer_s_per_token=layer_s_per_token)
    return ParallelGroup(0, 2, comm, policy), comm


def test_auto_cuts_uncompressed_when_compute_hides_the_link() -> None:
    meta = _meta(0, [], 512)
    # 512 x 64 float32 = 128 KiB a message. Slow link: int8 wins and no cut.
    slow, _ = _auto_group(10, layer_s_per_token=1e-6)
    assert _codec(slow, 512 * 64, torch.float32) == "int8"
    assert not exact_beats_coding(slow, 256 * 64, 512 * 64, 2, 512, torch.float32)
    assert micro_chunk_bounds(meta, 512, slow, 64, torch.float32) is None
    # Fast enough that int8 still pays uncut, but the compute between two all-reduces
    # (512 x 200 us / 2) covers both pieces' uncompressed exchanges: cut, uncompressed.
    fast, _ = _auto_group(300, layer_s_per_token=200e-6)
    assert _codec(fast, 512 * 64, torch.float32) == "int8"
    assert exact_beats_coding(fast, 256 * 64, 512 * 64, 2, 512, torch.float32)
    assert micro_chunk_bounds(meta, 512, fast, 64, torch.float32) == [0, 256, 512]
    # No compute figure (not measured): never.
    unknown, _ = _auto_group(300, layer_s_per_token=0.0)
    assert micro_chunk_bounds(meta, 512, unknown, 64, torch.float32) is None


def test_a_step_cut_for_auto_goes_uncompressed_then_resets() -> None:
    group, comm = _auto_group(300, layer_s_per_token=200e-6)
    net = load_model("tiny", group=group)
    stepper = PagedStepper(net, num_blocks=512, block_size=4, seed=3)
    gen = torch.Generator().manual_seed(7)
    # tiny's hidden size is 128: a 512-token message is 256 KiB in float32.
    step = stepper.prepare(prefills=[(0, torch.randint(0, 264, (512,), generator=gen).tolist())])
    with torch.inference_mode():
        net(step.input_ids, step.positions, stepper.kv_caches, step.meta)
    assert comm.forced and all(comm.forced)
    assert not comm.exact_only  # reset after the step
