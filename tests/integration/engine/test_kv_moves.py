"""KV moves at the engine level (tiny model, two engines in one process): a request
suspended on one engine, its KV read block by block through a KV codec and
written into another engine's blocks, goes on there with exactly the tokens it
would have produced; the prefill tap hands each layer's KV over as it is
computed; held blocks survive their owner."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from serve.comm.kv_codecs import KvCodec, KvGeometry, decode_kv, encode_kv
from serve.config import EngineConfig
from serve.engine.engine import LLMEngine, Suspension
from serve.engine.request import FinishReason, SamplingParams
from serve.model.loader import load_model

PROMPT = [(5 * i + 2) % 250 for i in range(45)]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _engine(model, block_size: int = 16) -> LLMEngine:
    return LLMEngine(model, EngineConfig(block_size=block_size, num_kv_blocks=64))


def _finish(engine: LLMEngine, tokens: list[int]) -> list[int]:
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    return tokens


def _reference(model, sp: SamplingParams) -> list[int]:
    engine = _engine(model)
    engine.add_request(engine.make_request("r", PROMPT, sp))
    return _finish(engine, [])


def _copy_kv(src: LLMEngine, dst: LLMEngine, s: Suspension, table: list[int], codec: str) -> None:
    cfg = src.model.config
    geometry = KvGeometry(cfg.num_kv_heads, cfg.head_dim, torch.float32)
    n = s.snapshot.num_tokens
    for layer in range(cfg.num_layers):
        for start in range(0, n, 64):
            stop = min(start + 64, n)
            k, v = src.runner.read_kv(layer, list(s.snapshot.block_table), start, stop)
            kf, vf = encode_kv(k, v, KvCodec.parse(codec))
            k2, v2 = decode_kv(kf, vf, stop - start, geometry)
            dst.runner.write_kv(layer, table, start, k2, v2)


@pytest.mark.parametrize("codec", ["none", "lossless"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_moved_at_token_40_goes_on_with_the_same_tokens(tiny, codec, temperature) -> None:
    sp = SamplingParams(max_tokens=96, temperature=temperature, seed=5, ignore_eos=True)
    reference = _reference(tiny, sp)
    src, dst = _engine(tiny), _engine(tiny, block_size=8)  # block sizes may differ
    src.add_request(src.make_request("r", PROMPT, sp))
    done: concurrent.futures.Future = concurrent.futures.Future()
    src.suspend_at("r", 40, done)
    tokens: list[int] = []
    while not done.done():
        for out in src.step():
            tokens.extend(out.new_token_ids)
    suspension = done.result()
    assert len(tokens) == 40 and suspension.state.output_token_ids == tuple(tokens)
    table = dst.stage(suspension.state, suspension.snapshot.num_tokens, exact=True)
    _copy_kv(src, dst, suspension, table, codec)
    src.release(suspension.snapshot)
    assert src.end_suspended("r").finish_reason is FinishReason.MIGRATED
    dst.start_staged("r")
    assert _finish(dst, tokens) == reference
    for engine in (src, dst):
        assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_preempted_tapped_prefill_hands_each_token_over_once(tiny) -> None:
    """Too few blocks for both requests: the tapped one is preempted part way
    through its chunked prefill and recomputes from token 0. Its sink still gets
    each token of each layer exactly once, in order, and the KV it got carries
    the request on elsewhere with the reference tokens."""
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = [(5 * i) % 250 + 1 for i in range(130)]
    reference = _finish_one(_engine(tiny), prompt, sp)
    cfg = EngineConfig(
        block_size=16, num_kv_blocks=10, max_num_batched_tokens=32, enable_prefix_caching=False
    )
    src = LLMEngine(tiny, cfg)
    other = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    src.add_request(src.make_request("a", [3] * 20, other))
    src.step()
    src.add_request(src.make_request("h", prompt, sp))
    pieces, tokens, suspension = _tap_to_first_token(src, "h")
    assert src.stats().num_preemptions > 0, "the tapped request was never preempted"
    for layer in range(tiny.config.num_layers):
        spans = [(start, start + k.shape[0]) for i, start, k, _ in pieces if i == layer]
        assert spans[0][0] == 0 and spans[-1][1] == len(prompt)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    dst = _engine(tiny)
    _hand_over(src, dst, suspension, pieces)
    assert _finish(dst, tokens) == reference


Pieces = list[tuple[int, int, torch.Tensor, torch.Tensor]]


def _tap_to_first_token(src: LLMEngine, rid: str) -> tuple[Pieces, list[int], Suspension]:
    """Taps request rid's KV and steps src until it is suspended after its first
    token: (the KV pieces handed to the tap, rid's tokens, the suspension)."""
    pieces: Pieces = []
    src.add_tap(rid, lambda layer, start, k, v: pieces.append((layer, start, k, v)))
    done: concurrent.futures.Future = concurrent.futures.Future()
    src.suspend_at(rid, 1, done)
    tokens: list[int] = []
    while not done.done():
        for out in src.step():
            if out.request_id == rid:
                tokens.extend(out.new_token_ids)
    return pieces, tokens, done.result()


def _hand_over(
    src: LLMEngine,
    dst: LLMEngine,
    suspension: Suspension,
    pieces: Pieces,
) -> None:
    """Stages the suspended request on dst with the tapped KV pieces, ends it on src
    and starts it on dst."""
    rid = suspension.state.request_id
    table = dst.stage(suspension.state, suspension.snapshot.num_tokens, exact=True)
    for layer, start, k, v in pieces:
        dst.runner.write_kv(layer, table, start, k, v)
    src.release(suspension.snapshot)
    src.end_suspended(rid)
    dst.start_staged(rid)


def _finish_one(engine: LLMEngine, prompt: list[int], sp: SamplingParams) -> list[int]:
    engine.add_request(engine.make_request("h", prompt, sp))
    return _finish(engine, [])


def test_held_blocks_are_not_reused_after_their_owner_left(tiny) -> None:
    engine = _engine(tiny)
    engine.add_request(engine.make_request("r", PROMPT, SamplingParams(max_tokens=4)))
    engine.step()
    snapshot = engine.snapshot("r")
    before = [engine.runner.read_kv(0, list(snapshot.block_table), 0, 32)[0].clone()]
    assert engine.abort_request("r") is not None
    # Another request takes every free block and writes its own KV.
    engine.add_request(engine.make_request("x", list(range(200, 260)), SamplingParams()))
    _finish(engine, [])
    after = engine.runner.read_kv(0, list(snapshot.block_table), 0, 32)[0]
    assert torch.equal(before[0], after)
    engine.release(snapshot)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_failed_hand_over_resumes_where_it_was(tiny) -> None:
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reference = _reference(tiny, sp)
    engine = _engine(tiny)
    engine.add_request(engine.make_request("r", PROMPT, sp))
    done: concurrent.futures.Future = concurrent.futures.Future()
    engine.suspend_at("r", 10, done)
    tokens: list[int] = []
    while not done.done():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert engine.step() == [] and not engine.has_unfinished()  # paused
    engine.release(done.result().snapshot)
    engine.resume_suspended("r")
    assert _finish(engine, tokens) == reference


def test_prefill_tap_hands_each_layer_over(tiny) -> None:
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = _reference(tiny, sp)
    src = LLMEngine(tiny, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=16))
    dst = _engine(tiny)
    src.add_request(src.make_request("r", PROMPT, sp))
    layers, tokens, suspension = _tap_to_first_token(src, "r")
    assert tokens == reference[:1]
    # Chunked prefill (16 tokens a step): every layer came in pieces, in order.
    starts = sorted({start for layer, start, _, _ in layers if layer == 0})
    assert starts == [0, 16, 32]
    assert len({layer for layer, *_ in layers}) == tiny.config.num_layers
    _hand_over(src, dst, suspension, layers)
    assert _finish(dst, tokens) == reference
