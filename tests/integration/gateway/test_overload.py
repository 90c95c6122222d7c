"""The gateway's prompt-token queue cap (--max-queued-prompt-tokens) with an
in-process replica that runs one sequence at a time, so a request's prompt tokens
stay queued until the one before it is done."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from serve.gateway.admission import RETRY_AFTER_KEY
from tests.fixtures.servers import Servers, idle_free_blocks, servers, shard_status

QUEUE_CAP = 100


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[Servers, str, str]]:
    for s in servers():
        shard = s.shard(max_num_seqs=1)
        yield s, shard, s.gateway([shard], max_queued_prompt_tokens=QUEUE_CAP)


def request(num_prompt: int, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt_token_ids=[(7 * i) % 250 + 3 for i in range(num_prompt)],
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


async def refusal(stub: inference_pb2_grpc.InferenceStub, num_prompt: int) -> tuple[float, int]:
    """A call that must be refused: (seconds to the refusal, retry-after-ms)."""
    start = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(request(num_prompt, 4), timeout=30):
            pass
    error = info.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert "prompt tokens wait for their first token" in (error.details() or "")
    hint = dict(error.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
    assert hint is not None
    return time.perf_counter() - start, int(hint)


async def scenario(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        running = stub.Generate(request(30, 4000), timeout=120)  # holds the replica
        assert (await running.read()).token_ids  # its prompt left the queue
        waiting = stub.Generate(request(60, 4), timeout=120)  # queued behind it: 60 tokens
        await asyncio.sleep(0.3)
        seconds, hint = await refusal(stub, 50)  # 60 + 50 > 100
        assert seconds < 1.0 and 50 <= hint <= 30_000
        fits = stub.Generate(request(40, 4), timeout=120)  # 60 + 40 = 100: admitted
        await asyncio.sleep(0.3)
        await refusal(stub, 1)  # the queue is full
        running.cancel()  # the waiting requests run and leave the queue
        for call in (waiting, fits):
            chunks = [c async for c in call]
            assert sum(len(c.token_ids) for c in chunks) == 4
        after = [c async for c in stub.Generate(request(90, 2), timeout=60)]
        assert after[-1].finish_reason


def test_queued_prompt_tokens_cap(gateway: tuple[Servers, str, str]) -> None:
    """Pass: with --max-queued-prompt-tokens 100 and a replica busy with one request,
    a queued 60-token prompt plus a new 50-token one is refused at once (under 1 s)
    with RESOURCE_EXHAUSTED and a retry-after-ms hint in [50, 30000]; a 40-token one
    (exactly 100) is admitted; with the queue full even a 1-token prompt is refused;
    once the replica is free the queued requests finish and the queue is empty
    again (a 90-token prompt runs), and every KV block is free afterwards."""
    _, shard, target = gateway
    total = shard_status(shard).kv_blocks_total
    asyncio.run(scenario(target))
    assert idle_free_blocks(shard) == total
