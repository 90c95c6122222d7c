"""Live migration and disaggregated prefill through the whole gRPC path: in-process
replicas (tiny model) behind a gateway; the KV goes replica to replica
(Shard.MoveKv -> Shard.ImportKv) and the client keeps one stream.

- a 128-token generation moved at output token 40 gives exactly the tokens of an
  unmoved run with the exact KV codecs, greedy and seeded sampling; with int8 and
  int4 the agreement is printed;
- Admin.Drain under 16 concurrent streams moves every request off a replica and
  each one completes with exactly the unmoved tokens (none repeated or lost);
- a replica that drains (as on SIGTERM) gets its requests moved by the gateway;
- prefill on a `prefill` replica handed over to a `decode` replica gives the
  tokens of a colocated run;
- a client that leaves while its request is being handed over leaves nothing
  behind on the target.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from shardwire.v1 import inference_pb2, inference_pb2_grpc, shard_pb2, shard_pb2_grpc

from serve.config import EngineConfig, ShardConfig
from serve.engine.engine import AsyncEngine
from serve.shard.app import start_shard
from tests.fixtures.servers import Servers, idle_free_blocks, servers
from tests.fixtures.streams import Stream

PROMPT = [(7 * i + 3) % 250 for i in range(37)]
MAX_TOKENS = 128
MIGRATE_AT = 40


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Servers, list[str], str]]:
    for s in servers():
        shards = [s.shard(), s.shard()]
        yield s, shards, s.gateway(shards)


def _admin(target: str) -> shard_pb2_grpc.AdminStub:
    return shard_pb2_grpc.AdminStub(grpc.insecure_channel(target))


def _run(target: str, **kwargs: object) -> list[int]:
    stream = Stream(target, **kwargs).start().join()  # type: ignore[arg-type]
    assert stream.code == "OK"
    return stream.tokens


def _migrated_run(
    target: str, codec: str, **kwargs: object
) -> tuple[list[int], shard_pb2.MigrateResponse]:
    stream = Stream(target, **kwargs).start()  # type: ignore[arg-type]
    assert stream.started.wait(30)
    request = shard_pb2.MigrateRequest(
        request_id=stream.request_id, at_output_token=MIGRATE_AT, kv_codec=codec
    )
    moved = _admin(target).Migrate(request, timeout=60)
    stream.join()
    assert stream.code == "OK"
    assert stream.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert moved.target and moved.target != moved.source
    return stream.tokens, moved


@pytest.mark.parametrize(
    ("codec", "temperature", "seed"),
    [("none", 0.0, None), ("lossless", 0.0, None), ("none", 0.8, 11), ("lossless", 0.8, 11)],
)
def test_migration_at_token_40_gives_the_unmigrated_tokens(
    stack, codec: str, temperature: float, seed: int | None
) -> None:
    s, shards, target = stack
    sampling = {"prompt": PROMPT, "temperature": temperature, "seed": seed}
    reference = _run(target, **sampling)
    tokens, moved = _migrated_run(target, codec, **sampling)
    assert moved.num_output_tokens == MIGRATE_AT
    assert len(tokens) == MAX_TOKENS
    assert tokens == reference
    for shard in shards:  # every block back on both replicas
        assert idle_free_blocks(shard) == s.shards[shards.index(shard)].engine.engine.kv.num_blocks


def test_lossy_kv_codecs_report_their_agreement(stack) -> None:
    _, _, target = stack
    sampling = {"prompt": PROMPT, "temperature": 0.0}
    reference = _run(target, **sampling)
    for codec in ("int8", "int8+zstd", "int4", "int4+zstd"):
        tokens, moved = _migrated_run(target, codec, **sampling)
        assert moved.num_output_tokens == MIGRATE_AT and len(tokens) == MAX_TOKENS
        assert tokens[:MIGRATE_AT] == reference[:MIGRATE_AT]
        after = sum(a == b for a, b in zip(tokens, reference, strict=True)) - MIGRATE_AT
        print(f"{codec}: {after}/{MAX_TOKENS - MIGRATE_AT} tokens after the move agree")


def _streams_on(s: Servers, shard: str) -> int:
    gateway = s.gateways[0]
    return sum(f.replica.address == shard for f in gateway.router.flights.values())


def test_drain_under_16_streams_moves_every_request_without_a_gap(stack) -> None:
    s, shards, target = stack
    prompts = [[(11 * i + 5 * j) % 250 for j in range(9 + 3 * i)] for i in range(16)]
    streams = [Stream(target, p, max_tokens=96).start() for p in prompts]
    for stream in streams:
        assert stream.started.wait(30)
    busy = max(shards, key=lambda a: _streams_on(s, a))
    assert _streams_on(s, busy) > 0
    response = _admin(target).Drain(shard_pb2.DrainRequest(replica=busy), timeout=60)
    for stream in streams:
        stream.join()
    assert response.num_migrated > 0, response
    # Out of rotation: the unmoved reference now runs on the other replica.
    references = [Stream(target, p, max_tokens=96).start() for p in prompts]
    for stream, reference in zip(streams, references, strict=True):
        reference.join()
        assert stream.code == reference.code == "OK"
        assert len(stream.tokens) == 96
        assert stream.tokens == reference.tokens
    _admin(target).Drain(shard_pb2.DrainRequest(replica=busy, uncordon=True), timeout=10)
    assert idle_free_blocks(busy) == s.shards[shards.index(busy)].engine.engine.kv.num_blocks


def test_a_draining_replica_has_its_requests_moved(stack) -> None:
    s, shards, target = stack
    gateway = s.gateways[0]
    streams = [Stream(target, PROMPT[: 10 + i], max_tokens=400).start() for i in range(4)]
    for stream in streams:
        assert stream.started.wait(30)
    busy = max(shards, key=lambda a: _streams_on(s, a))
    server = s.shards[shards.index(busy)]
    started = time.monotonic()
    assert s.run(server.drain(30)), "requests stayed on the draining replica"
    took = time.monotonic() - started
    for stream in streams:
        stream.join()
        assert (stream.code, len(stream.tokens)) == ("OK", 400)
    assert took < 10, f"draining took {took:.1f} s"
    # Back to serving for the other tests (SIGTERM would stop it here).
    server.servicer.draining = False
    server.drain_gate.is_draining = False
    s.run(server.health.set("", 1))
    s.run(server.health.set("shardwire.v1.Shard", 1))
    deadline = time.monotonic() + 10
    while len(gateway.router.healthy_replicas()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_disaggregated_prefill_gives_the_colocated_tokens() -> None:
    for s in servers():
        engine = EngineConfig(kv_cache_bytes=16 * 1024 * 1024)
        colocated = s.gateway([s.shard()])
        roles = []
        for role in ("prefill", "decode"):
            server = s.run(start_shard(ShardConfig(port=0, engine=engine, role=role)), 120)
            s.shards.append(server)
            roles.append(f"127.0.0.1:{server.port}")
        disaggregated = s.gateway(roles, kv_codec="lossless")
        for n in (1, 5, 37, 100):
            prompt = PROMPT[:n] if n <= len(PROMPT) else (PROMPT * 3)[:n]
            reference = _run(colocated, prompt=prompt, max_tokens=48)
            assert _run(disaggregated, prompt=prompt, max_tokens=48) == reference
        decode = s.shards[-1].engine.engine
        assert decode.num_steps > 0, "the decode replica never ran"
        prefill = s.shards[-2].engine.engine
        assert prefill.kv.num_free_blocks == prefill.kv.num_blocks


def test_a_request_whose_prefill_hand_over_failed_can_move_later() -> None:
    """The decode replica cannot hold the prompt, so the prefill replica keeps the
    request after its first token; an explicit move then takes it to a third one."""
    for s in servers():
        started = []
        for role, engine in (
            ("prefill", EngineConfig(kv_cache_bytes=16 * 1024 * 1024)),
            ("decode", EngineConfig(num_kv_blocks=4)),  # 64 tokens: too few to stage
            ("both", EngineConfig(kv_cache_bytes=16 * 1024 * 1024)),
        ):
            server = s.run(start_shard(ShardConfig(port=0, engine=engine, role=role)), 120)
            s.shards.append(server)
            started.append(f"127.0.0.1:{server.port}")
        prefill, _, third = started
        target = s.gateway(started, kv_codec="lossless")
        prompt = (PROMPT * 3)[:100]
        reference = _run(s.gateway([third]), prompt=prompt)
        stream = Stream(target, prompt).start()
        assert stream.started.wait(30)
        deadline = time.monotonic() + 30
        while len(stream.tokens) < 3:  # past the hand-over point: it stayed on prefill
            assert time.monotonic() < deadline, (stream.code, stream.tokens)
            time.sleep(0.01)
        request = shard_pb2.MigrateRequest(
            request_id=stream.request_id, target=third, kv_codec="lossless"
        )
        moved = _admin(target).Migrate(request, timeout=60)
        assert (moved.source, moved.target) == (prefill, third)
        stream.join()
        assert stream.code == "OK"
        assert stream.tokens == reference


def _migrate(target: str, rid: str, moves: list[shard_pb2.MigrateResponse]) -> None:
    moves.append(_admin(target).Migrate(shard_pb2.MigrateRequest(request_id=rid), timeout=60))


def test_a_client_gone_during_the_hand_over_leaves_nothing_on_the_target(monkeypatch) -> None:
    """The client leaves while the target takes the request over (its engine start
    is slowed down here): once the move completes, the gateway aborts the request
    on the target, which would otherwise decode it and wait for a Resume that never
    comes until its staging expiry."""
    start = AsyncEngine.start
    starting = threading.Event()

    async def slow_start(self: AsyncEngine, request_id: str) -> object:
        starting.set()
        await asyncio.sleep(1.0)  # the client leaves meanwhile
        return await start(self, request_id)

    monkeypatch.setattr(AsyncEngine, "start", slow_start)
    for s in servers():
        shards = [s.shard(), s.shard()]
        target = s.gateway(shards)
        sampling = inference_pb2.SamplingParams(max_tokens=400, ignore_eos=True)
        request = inference_pb2.GenerateRequest(prompt_token_ids=PROMPT, sampling=sampling)
        with grpc.insecure_channel(target) as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
            rid = next(call).request_id
            moves: list[shard_pb2.MigrateResponse] = []
            migrate = threading.Thread(target=_migrate, args=(target, rid, moves))
            migrate.start()
            assert starting.wait(30)
            call.cancel()
            migrate.join(60)
        assert moves and moves[0].target, moves
        server = next(x for x in s.shards if moves[0].target.endswith(f":{x.port}"))
        assert server.servicer is not None
        deadline = time.monotonic() + 5
        while rid in server.servicer.kv._started or rid in server.engine.engine.scheduler.requests:
            assert time.monotonic() < deadline, "the target still holds the abandoned request"
            time.sleep(0.05)
