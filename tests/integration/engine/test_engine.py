"""The engine on the built-in tiny model: batching must not change results."""

import asyncio

import pytest
import torch

from serve.config import EngineConfig
from serve.engine.engine import AsyncEngine, LLMEngine
from serve.engine.request import FinishReason, SamplingParams
from serve.model.loader import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 40, 3, 70, 33)]


def _run(
    model, prompts, cfg: EngineConfig, sp: SamplingParams
) -> tuple[dict[str, list[int]], LLMEngine]:
    engine = LLMEngine(model, cfg)
    for i, p in enumerate(prompts):
        engine.add_request(engine.make_request(str(i), p, sp))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens, engine


def test_batched_chunked_preempted_greedy_equals_one_at_a_time(tiny) -> None:
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = {str(i): _run(tiny, [p], EngineConfig(), sp)[0]["0"] for i, p in enumerate(_prompts())}
    # A small token budget forces chunked prefill; a small pool forces preemption.
    cfg = EngineConfig(max_num_batched_tokens=32, num_kv_blocks=20)
    batched, engine = _run(tiny, _prompts(), cfg, sp)
    assert engine.scheduler.num_preemptions > 0
    assert batched == alone
    assert engine.kv.num_free_blocks == 20


def test_seeded_sampling_is_independent_of_the_batch(tiny) -> None:
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True)
    alone = _run(tiny, [_prompts()[1]], EngineConfig(), sp)[0]["0"]
    batched = _run(tiny, _prompts(), EngineConfig(max_num_batched_tokens=48), sp)[0]["1"]
    assert batched == alone


def test_second_turn_reuses_the_first_turns_kv(tiny) -> None:
    engine = LLMEngine(tiny, EngineConfig(block_size=16))
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = list(range(1, 70))
    engine.add_request(engine.make_request("t1", first, sp))
    reply: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            reply.extend(out.new_token_ids)
    second = first + reply + [10, 11, 12]
    engine.add_request(engine.make_request("t2", second, sp))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[0].num_cached_tokens == (len(first) + len(reply) - 1) // 16 * 16
    assert outs[0].num_cached_tokens >= 64


def test_late_request_gets_its_first_token_before_the_others_finish(tiny) -> None:
    async def scenario() -> tuple[int, int]:
        engine = AsyncEngine(LLMEngine(tiny, EngineConfig()))
        sp_long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        sp_short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        progress = {"long": 0}
        late_first_at: list[int] = []

        async def long_run(rid: str) -> None:
            async for out in engine.generate(rid, list(range(1, 20)), sp_long):
                progress["long"] += len(out.new_token_ids)

        async def late() -> None:
            while progress["long"] < 20:
                await asyncio.sleep(0.005)
            async for _ in engine.generate("late", list(range(5, 30)), sp_short):
                late_first_at.append(progress["long"])
                break

        await asyncio.gather(long_run("a"), long_run("b"), late())
        engine.shutdown()
        return late_first_at[0], progress["long"]

    first_at, total = asyncio.run(scenario())
    assert total == 400
    assert first_at < total


def test_cancelled_stream_returns_its_blocks(tiny) -> None:
    async def scenario() -> tuple[int, int, FinishReason | None]:
        core = LLMEngine(tiny, EngineConfig())
        engine = AsyncEngine(core)
        before = core.kv.num_free_blocks
        sp = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        stream = engine.generate("c", list(range(100)), sp)
        count = 0
        async for _ in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()
        for _ in range(100):
            if core.kv.num_free_blocks == before and not core.has_unfinished():
                break
            await asyncio.sleep(0.02)
        after = core.kv.num_free_blocks
        engine.shutdown()
        return before, after, None

    before, after, _ = asyncio.run(scenario())
    assert after == before
