"""Logits parity of the shardwire model with transformers on the same checkpoint,
across full prefill, chunked prefill and batches mixing decodes with prefills."""

from __future__ import annotations

import pytest
import torch

from serve.model.llama import LlamaForCausalLM
from serve.model.loader import load_model
from tests.fixtures.hf_checkpoints import Checkpoint, CheckpointFactory
from tests.fixtures.paged import PagedStepper

# float32 logits of the paged model vs transformers' eager attention.
ATOL = 1e-5


def _tokens(ckpt: Checkpoint, n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ckpt.vocab_size, (n,), generator=gen).tolist()


def _reference(ckpt: Checkpoint, tokens: list[int]) -> torch.Tensor:
    """transformers logits [len(tokens), vocab] for one whole sequence."""
    with torch.no_grad():
        return ckpt.hf_model()(torch.tensor([tokens])).logits[0].float()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < atol, f"max abs logit diff {diff:.3g} >= {atol}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module")
def nets() -> dict[str, LlamaForCausalLM]:
    """float32 shardwire models, one per checkpoint folder (loaded once)."""
    return {}


def _net(nets: dict[str, LlamaForCausalLM], ckpt: Checkpoint) -> LlamaForCausalLM:
    key = str(ckpt.path)
    if key not in nets:
        nets[key] = load_model(key)
    return nets[key]


def test_full_prefill(hf_checkpoint: Checkpoint, nets: dict[str, LlamaForCausalLM]) -> None:
    tokens = _tokens(hf_checkpoint, 37, seed=1)
    stepper = PagedStepper(_net(nets, hf_checkpoint))
    ours = stepper.step(prefills=[(0, tokens)])
    _assert_close(ours, _reference(hf_checkpoint, tokens))


def test_prefill_in_two_chunks(
    hf_checkpoint: Checkpoint, nets: dict[str, LlamaForCausalLM]
) -> None:
    """The second chunk attends to the first chunk's cached K/V; the split is
    in the middle of a block."""
    tokens = _tokens(hf_checkpoint, 30, seed=2)
    stepper = PagedStepper(_net(nets, hf_checkpoint), block_size=4)
    first = stepper.step(prefills=[(0, tokens[:13])])
    second = stepper.step(prefills=[(0, tokens[13:])])
    assert stepper.context_len(0) == 30
    _assert_close(torch.cat([first, second]), _reference(hf_checkpoint, tokens))


def test_prefill_then_token_by_token_decode(
    hf_checkpoint: Checkpoint, nets: dict[str, LlamaForCausalLM]
) -> None:
    tokens = _tokens(hf_checkpoint, 24, seed=3)
    stepper = PagedStepper(_net(nets, hf_checkpoint), block_size=4)
    rows = [stepper.step(prefills=[(0, tokens[:9])])]
    rows += [stepper.step(decodes=[(0, t)]) for t in tokens[9:]]
    _assert_close(torch.cat(rows), _reference(hf_checkpoint, tokens))


def test_mixed_batch_of_decodes_and_prefill_chunks(
    hf_checkpoint: Checkpoint, nets: dict[str, LlamaForCausalLM]
) -> None:
    """Several sequences of different lengths decode in one forward with a
    prefill chunk of another sequence, over scattered blocks; a freed
    sequence's blocks (still holding its K/V) are reused by a new one."""
    net = _net(nets, hf_checkpoint)
    stepper = PagedStepper(net, num_blocks=48, block_size=4, seed=7)
    seqs = {i: _tokens(hf_checkpoint, n, seed=10 + i) for i, n in enumerate((8, 17, 22, 19, 13))}
    a, b, c, d, e = seqs
    got: dict[int, list[torch.Tensor]] = {i: [] for i in seqs}

    def run(decodes: list[int], prefills: list[tuple[int, int]]) -> None:
        """Decodes the next token of each seq in `decodes`; prefills `n` more
        tokens of each (seq, n) in `prefills`."""
        dec = [(s, seqs[s][stepper.context_len(s)]) for s in decodes]
        pre = []
        for s, n in prefills:
            start = stepper.context_len(s)
            pre.append((s, seqs[s][start : start + n]))
        logits = stepper.step(decodes=dec, prefills=pre)
        row = 0
        for s, _ in dec:
            got[s].append(logits[row : row + 1])
            row += 1
        for s, toks in pre:
            got[s].append(logits[row : row + len(toks)])
            row += len(toks)
        assert row == logits.shape[0]

    run([], [(a, 5), (b, 11)])  # two whole prompts in one step
    run([a, b], [(c, 17)])
    run([a, b, c], [(d, 9)])  # three decodes of lengths 6, 12, 18 and a chunk
    run([a, b, c], [(d, 7)])  # a second chunk that attends to cached K/V
    run([b, c, d], [])
    stepper.free_sequence(a)
    run([b, c, d], [(e, 12)])  # e's blocks are a's old ones
    run([b, d, c, e], [])
    assert len(stepper.block_table(e)) == 4

    for s, tokens in seqs.items():
        ours = torch.cat(got[s])
        assert ours.shape[0] == len(tokens)
        _assert_close(ours, _reference(hf_checkpoint, tokens))


def test_block_tables_are_scattered() -> None:
    """The helper itself: blocks are not handed out in pool order."""
    net = load_model("tiny")
    stepper = PagedStepper(net, num_blocks=32, block_size=4, seed=0)
    stepper.step(prefills=[(0, list(range(1, 30)))])
    table = stepper.block_table(0)
    assert len(table) == 8
    assert table != sorted(table)
    assert table != list(range(table[0], table[0] + 8))


@pytest.mark.parametrize("arch", ["llama3", "qwen2"])
def test_bfloat16_smoke(arch: str, request: pytest.FixtureRequest) -> None:
    ckpt: Checkpoint = request.getfixturevalue(f"{arch}_checkpoint")
    net = load_model(str(ckpt.path), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    tokens = _tokens(ckpt, 33, seed=4)
    stepper = PagedStepper(net)
    assert stepper.kv_caches[0].dtype == torch.bfloat16
    ours = torch.cat(
        [stepper.step(prefills=[(0, tokens[:20])])]
        + [stepper.step(decodes=[(0, t)]) for t in tokens[20:]]
    )
    ref = _reference(ckpt, tokens)
    assert ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    diff = (ours - ref).abs().max().item()
    assert diff < 0.05 * ref.abs().max().item() + 0.05
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.8


def test_sliding_window_matches_transformers(checkpoint_factory: CheckpointFactory) -> None:
    """Mistral with a window of 6 tokens on 30-token sequences: every path
    (whole prefill, chunked prefill, decodes) keeps to the window."""
    windowed = checkpoint_factory("mistral", sliding_window=6)
    full = checkpoint_factory("mistral", sliding_window=4096)
    net = load_model(str(windowed.path))
    assert net.config.sliding_window == 6
    tokens = _tokens(windowed, 30, seed=5)
    ref = _reference(windowed, tokens)
    # The window really changes the result (same weights, no window).
    assert (ref - _reference(full, tokens))[6:].abs().max() > 1e-2
    assert torch.allclose(ref[:6], _reference(full, tokens)[:6], atol=ATOL)

    whole = PagedStepper(net).step(prefills=[(0, tokens)])
    _assert_close(whole, ref)
    stepper = PagedStepper(net, block_size=4, seed=3)
    rows = [stepper.step(prefills=[(0, tokens[:5])]), stepper.step(prefills=[(0, tokens[5:17])])]
    rows += [stepper.step(decodes=[(0, t)]) for t in tokens[17:]]
    _assert_close(torch.cat(rows), ref)
