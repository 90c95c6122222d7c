"""Replica failure as the gateway sees it, with two in-process replicas (tiny
model) behind one gateway: a request whose replica fails before the first token
moves to the other replica; one that has streamed tokens ends with UNAVAILABLE;
a replica that reports NOT_SERVING leaves rotation although it still answers
Status, and comes back when it reports SERVING again."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.client import Client
from serve.config import EngineConfig, GatewayConfig, ShardConfig
from serve.gateway.app import GatewayServer, start_gateway
from serve.shard.app import SERVICE_NAME, ShardServer, start_shard
from tests.fixtures.servers import idle_free_blocks, servers, shard_status


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    shards: list[ShardServer]
    gateway: GatewayServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture
def stack_factory() -> Iterator[Callable[[float], Stack]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="failover-servers", daemon=True)
    thread.start()
    stacks: list[Stack] = []

    def make(poll_interval_s: float) -> Stack:
        async def start() -> Stack:
            engine = EngineConfig(kv_cache_bytes=16 * 1024 * 1024)
            shards = [await start_shard(ShardConfig(port=0, engine=engine)) for _ in range(2)]
            config = GatewayConfig(
                port=0,
                replicas=tuple(f"127.0.0.1:{s.port}" for s in shards),
                status_poll_interval_s=poll_interval_s,
                startup_timeout_s=30.0,
            )
            gateway = await start_gateway(config)
            await gateway.router.refresh()  # both replicas known before the test acts
            return Stack(loop, shards, gateway)

        stack = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
        stacks.append(stack)
        return stack

    yield make

    async def stop() -> None:
        for stack in stacks:
            await stack.gateway.stop(0)
            for shard in stack.shards:
                await shard.stop(0)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _generate(target: str, max_tokens: int = 8) -> tuple[int, str]:
    """(tokens, status) of one greedy generation."""
    num_tokens = 0
    try:
        with Client(target, timeout=30) as client:
            for chunk in client.generate("failover", max_tokens=max_tokens, ignore_eos=True):
                num_tokens += len(chunk.token_ids)
    except grpc.RpcError as err:
        return num_tokens, err.code().name
    return num_tokens, "OK"


def test_request_moves_to_another_replica_before_its_first_token(stack_factory) -> None:
    # Polls far apart: the gateway learns of the failure only from the request itself.
    stack = stack_factory(600.0)
    first, second = stack.gateway.router.replicas
    assert first.is_healthy and second.is_healthy
    # Idle replicas tie on load, so the router picks the first one: take it down hard.
    stack.run(stack.shards[0].server.stop(0))
    results = [_generate(stack.target) for _ in range(3)]
    assert results == [(8, "OK")] * 3
    assert not first.is_healthy, "the failed replica is out of rotation"
    assert second.is_healthy


def test_a_request_that_failed_over_counts_on_its_new_replica(stack_factory) -> None:
    stack = stack_factory(600.0)
    first, second = stack.gateway.router.replicas
    stack.run(stack.shards[0].server.stop(0))
    result: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: result.append(_generate(stack.target, 600)))
    thread.start()
    deadline = time.monotonic() + 20
    while not second.num_active:
        assert time.monotonic() < deadline, "the request never reached the second replica"
        time.sleep(0.01)
    # Its outstanding tokens moved with it: least-load routing sees the right replica.
    assert (first.num_active, first.outstanding_tokens) == (0, 0)
    assert second.outstanding_tokens > 0
    thread.join(60)
    assert result == [(600, "OK")]
    assert (second.num_active, second.outstanding_tokens) == (0, 0)


def test_stream_with_tokens_ends_with_unavailable(stack_factory) -> None:
    stack = stack_factory(600.0)
    result: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: result.append(_generate(stack.target, 4000)))
    thread.start()
    replicas = stack.gateway.router.replicas
    deadline = time.monotonic() + 20
    while not any(r.num_active for r in replicas):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = next(i for i, r in enumerate(replicas) if r.num_active)
    time.sleep(0.3)  # tokens are flowing
    stack.run(stack.shards[busy].server.stop(0))
    thread.join(30)
    (num_tokens, code) = result[0]
    assert code == "UNAVAILABLE"
    assert 0 < num_tokens < 4000, "ended part way, not retried from the start"


def test_not_serving_replica_leaves_rotation_and_comes_back(stack_factory) -> None:
    stack = stack_factory(0.1)
    first, _ = stack.gateway.router.replicas
    health = stack.shards[0].health

    def wait(predicate: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    stack.run(health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING))
    wait(lambda: not first.is_healthy, "NOT_SERVING noticed")
    time.sleep(0.3)  # several more polls, all answered by Status
    assert not first.is_healthy
    assert [_generate(stack.target) for _ in range(2)] == [(8, "OK")] * 2
    assert first.num_active == 0
    stack.run(health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING))
    wait(lambda: first.is_healthy, "back in rotation")


def test_a_request_failing_over_from_a_prefill_replica_drops_its_hand_over(caplog) -> None:
    """The prefill replica dies before its first token: the request goes to the
    decode replica, which serves it whole instead of being told to hand the
    request over to itself."""
    caplog.set_level(logging.WARNING)
    for s in servers():
        prefill = s.shard(role="prefill")
        decode = s.shard(role="decode")
        gateway = s.gateway([prefill, decode], status_poll_interval_s=600.0)
        assert _generate(gateway, 20) == (20, "OK")  # prefill -> decode hand-over
        s.stop_shard(prefill)
        caplog.clear()
        assert _generate(gateway, 20) == (20, "OK")
        handovers = [r.getMessage() for r in caplog.records if "hand-over to" in r.getMessage()]
        assert handovers == []
        assert idle_free_blocks(decode) == shard_status(decode).kv_blocks_total
