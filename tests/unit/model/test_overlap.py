"""Micro-chunked steps (serve.model.overlap): the pieces' forward must give
the whole step's hidden states, decodes, chunked prefills and cached prefixes
included, and the policy must cut only where it is told to."""

from __future__ import annotations

import copy

import torch

from serve.comm.codecs import CodecSpec
from serve.dist.group import OverlapPolicy, ParallelGroup
from serve.model.attention import AttentionMetadata, PrefillChunk
from serve.model.loader import load_model
from serve.model.overlap import link_bound, micro_chunk_bounds, split_metadata
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
    with torch.inference_mode():
        comm.calls = 0
        whole = net(step.input_ids, step.positions, stepper.kv_caches, step.meta)
        assert comm.calls == per_step
        group.overlap = FORCED
        comm.calls = 0
        pieces = net(step.input_ids, step.positions, caches, step.meta)
        assert comm.calls == FORCED.num_chunks * per_step
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches, stepper.kv_caches, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
