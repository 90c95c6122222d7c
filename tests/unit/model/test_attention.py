"""Paged attention against a dense float64 reference written out by hand.

The reference: query at position i of a sequence attends to that sequence's
keys j with j <= i, and with a sliding window W also j > i - W (W keys,
itself included), the semantics of Mistral's `sliding_window`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.model.attention import AttentionMetadata, PrefillChunk, paged_attention, write_kv

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
SCALE = HEAD_DIM**-0.5


def reference_attention(
    q: torch.Tensor,  # [L, heads, d]
    k: torch.Tensor,  # [L, kv_heads, d]
    v: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Causal (optionally windowed) attention of one whole sequence, float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * SCALE
    i = torch.arange(q.shape[0])[:, None]
    j = torch.arange(q.shape[0])[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hij,jhd->ihd", probs, v)


@dataclass
class Seq:
    q: torch.Tensor  # [L, heads, d]
    k: torch.Tensor  # [L, kv_heads, d]
    v: torch.Tensor
    blocks: list[int]
    done: int = 0  # tokens already in the cache


class Pool:
    """A KV pool filled with garbage and sequences with scattered blocks."""

    def __init__(self, num_blocks: int, block_size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.block_size = block_size
        self.cache = torch.randn(2, num_blocks, block_size, KV_HEADS, HEAD_DIM, generator=gen) * 50
        self.free = torch.randperm(num_blocks, generator=gen).tolist()

    def sequence(self, length: int) -> Seq:
        g = self.gen
        num_blocks = -(-length // self.block_size)
        blocks = [self.free.pop() for _ in range(num_blocks)]
        return Seq(
            q=torch.randn(length, HEADS, HEAD_DIM, generator=g),
            k=torch.randn(length, KV_HEADS, HEAD_DIM, generator=g),
            v=torch.randn(length, KV_HEADS, HEAD_DIM, generator=g),
            blocks=blocks,
        )

    def step(
        self, decodes: list[Seq], prefills: list[tuple[Seq, int]], window: int | None
    ) -> list[torch.Tensor]:
        """Writes this step's K/V, runs paged_attention, and returns each
        entry's output rows (decodes first, then prefills)."""
        bs = self.block_size
        entries = [(s, 1) for s in decodes] + list(prefills)
        q, k, v, slots, spans = [], [], [], [], []
        chunks: list[PrefillChunk] = []
        decode_lens: list[int] = []
        row = 0
        for idx, (s, n) in enumerate(entries):
            pos = torch.arange(s.done, s.done + n)
            table = torch.tensor(s.blocks)
            slots.append(table[pos // bs] * bs + pos % bs)
            q.append(s.q[pos])
            k.append(s.k[pos])
            v.append(s.v[pos])
            s.done += n
            if idx < len(decodes):
                decode_lens.append(s.done)
            else:
                chunks.append(PrefillChunk(row, n, s.done, table))
            spans.append((row, row + n))
            row += n
        width = max((len(s.blocks) for s in decodes), default=1)
        tables = torch.zeros(len(decodes), width, dtype=torch.long)
        for i, s in enumerate(decodes):
            tables[i, : len(s.blocks)] = torch.tensor(s.blocks)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots),
            num_decode_tokens=len(decodes),
            decode_block_tables=tables,
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
            prefills=chunks,
            block_size=bs,
        )
        write_kv(self.cache, torch.cat(k), torch.cat(v), meta.slot_mapping)
        out = paged_attention(torch.cat(q), self.cache, meta, SCALE, window)
        return [out[a:b] for a, b in spans]


def _check(seq: Seq, rows: list[torch.Tensor], window: int | None) -> None:
    ours = torch.cat(rows).double()
    ref = reference_attention(seq.q, seq.k, seq.v, window)[: ours.shape[0]]
    assert (ours - ref).abs().max().item() < 1e-5


def test_write_kv_touches_only_its_slots() -> None:
    pool = Pool(num_blocks=8, block_size=4, seed=0)
    before = pool.cache.clone()
    k = torch.randn(3, KV_HEADS, HEAD_DIM)
    v = torch.randn(3, KV_HEADS, HEAD_DIM)
    slots = torch.tensor([5, 30, 17])
    write_kv(pool.cache, k, v, slots)
    flat = pool.cache.view(2, 32, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat[0, slots], k)
    assert torch.equal(flat[1, slots], v)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], before.view(2, 32, KV_HEADS, HEAD_DIM)[:, untouched])


def test_whole_prefill() -> None:
    pool = Pool(num_blocks=16, block_size=4, seed=1)
    s = pool.sequence(23)
    _check(s, pool.step([], [(s, 23)], None), None)


def test_chunked_prefill_attends_to_cached_keys() -> None:
    pool = Pool(num_blocks=16, block_size=4, seed=2)
    s = pool.sequence(23)
    rows = pool.step([], [(s, 6)], None) + pool.step([], [(s, 9)], None)
    rows += pool.step([], [(s, 8)], None)
    _check(s, rows, None)


def test_decodes_of_different_lengths_with_prefills_in_one_step() -> None:
    pool = Pool(num_blocks=40, block_size=4, seed=3)
    a, b, c, d = (pool.sequence(n) for n in (6, 19, 11, 16))
    rows: dict[int, list[torch.Tensor]] = {id(s): [] for s in (a, b, c, d)}

    def record(seqs: list[Seq], out: list[torch.Tensor]) -> None:
        for s, r in zip(seqs, out, strict=True):
            rows[id(s)].append(r)

    record([a, b, c], pool.step([], [(a, 4), (b, 15), (c, 10)], None))
    # Three decodes (context 5, 16, 11) and two prefill chunks in one call.
    record([a, b, c, d], pool.step([a, b, c], [(d, 7)], None))
    record([a, b, d], pool.step([a, b], [(d, 9)], None))
    record([b], pool.step([], [(b, 2)], None))
    for s in (a, b, c, d):
        _check(s, rows[id(s)], None)
    assert [s.done for s in (a, b, c, d)] == [6, 19, 11, 16]


def test_sliding_window_on_every_path() -> None:
    window = 5
    pool = Pool(num_blocks=40, block_size=4, seed=4)
    a, b = pool.sequence(22), pool.sequence(14)
    rows_a = pool.step([], [(a, 21)], window)  # whole prefill: one masked pass
    rows_b = pool.step([], [(b, 3)], window)
    mixed = pool.step([a], [(b, 8)], window)
    rows_a.append(mixed[0])
    rows_b.append(mixed[1])
    for _ in range(3):
        rows_b += pool.step([b], [], window)
    _check(a, rows_a, window)
    _check(b, rows_b, window)
    # The window changes the result, and a window as long as the sequence does not.
    no_window = reference_attention(a.q, a.k, a.v, None)
    assert (torch.cat(rows_a).double() - no_window)[window:].abs().max() > 1e-2
    assert torch.allclose(torch.cat(rows_a).double()[:window], no_window[:window], atol=1e-5)
    c = pool.sequence(9)
    _check(c, pool.step([], [(c, 9)], 9), None)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    chunk=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 4, 16]),
    window=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**16),
)
def test_any_schedule_matches_reference(
    lengths: list[int], chunk: int, block_size: int, window: int | None, seed: int
) -> None:
    """Sequences prefill in chunks of at most `chunk` tokens and decode once
    their prompt (the first half) is in; every step mixes whatever is ready."""
    blocks_needed = sum(-(-n // block_size) for n in lengths)
    pool = Pool(num_blocks=blocks_needed + 3, block_size=block_size, seed=seed)
    seqs = [pool.sequence(n) for n in lengths]
    prompt = [max(1, n // 2) for n in lengths]
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    while any(s.done < len(s.q) for s in seqs):
        decodes = [i for i, s in enumerate(seqs) if prompt[i] <= s.done < len(s.q)]
        prefills = [
            (i, min(chunk, prompt[i] - s.done)) for i, s in enumerate(seqs) if s.done < prompt[i]
        ]
        out = pool.step([seqs[i] for i in decodes], [(seqs[i], n) for i, n in prefills], window)
        for i, r in zip(decodes + [i for i, _ in prefills], out, strict=True):
            rows[i].append(r)
    for s, r in zip(seqs, rows, strict=True):
        _check(s, r, window)
