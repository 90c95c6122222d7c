"""serve.gateway.router: replica choice by load and health, token accounting."""

from __future__ import annotations

import asyncio

import pytest

from serve.config import PrefixAffinityConfig
from serve.errors import Unavailable
from serve.gateway.router import ReplicaStatus, Router

STATUS = ReplicaStatus(
    model="tiny",
    tp_size=1,
    dtype="float32",
    vocab_size=264,
    max_model_len=2048,
    eos_token_ids=(258, 262),
    kv_blocks_free=10,
    kv_blocks_total=10,
    num_running=0,
    num_waiting=0,
)


def _router(n: int) -> Router:
    # Ports nobody listens on: nothing here needs a live replica.
    router = Router([f"127.0.0.1:{i + 1}" for i in range(n)])
    for replica in router.replicas:
        replica.status = STATUS
        replica.is_healthy = True
    return router


def test_least_loaded_healthy_replica_is_chosen() -> None:
    async def run() -> None:
        router = _router(3)
        a, b, c = router.replicas
        with router.track(a, 100), router.track(b, 10):
            assert router.choose() is c
            with router.track(c, 50):
                assert router.choose() is b
                b.mark_unhealthy("test")
                assert router.choose() is c
        assert (a.outstanding_tokens, b.outstanding_tokens, c.outstanding_tokens) == (0, 0, 0)
        await router.close()

    asyncio.run(run())


def test_lease_shrinks_as_tokens_arrive() -> None:
    async def run() -> None:
        router = _router(1)
        (replica,) = router.replicas
        with router.track(replica, 30) as lease:
            lease.consume(12)
            assert replica.outstanding_tokens == 18 and replica.num_active == 1
            lease.consume(100)
            assert replica.outstanding_tokens == 0
        assert replica.outstanding_tokens == 0 and replica.num_active == 0
        await router.close()

    asyncio.run(run())


def test_no_healthy_replica_is_unavailable() -> None:
    async def run() -> None:
        router = _router(2)
        for replica in router.replicas:
            replica.mark_unhealthy("test")
        assert not router.is_serving
        with pytest.raises(Unavailable, match="no healthy replica"):
            router.choose()
        await router.close()

    asyncio.run(run())


def test_unreachable_replicas_time_out_and_report_health() -> None:
    changes: list[bool] = []

    async def listener(serving: bool) -> None:
        changes.append(serving)

    async def run() -> None:
        router = Router(["127.0.0.1:1"], status_timeout_s=0.2, on_health_change=listener)
        await router.refresh()
        assert not router.replicas[0].is_healthy
        with pytest.raises(Unavailable, match="no replica answered within 0.3 s"):
            await router.wait_ready(0.3)
        await router.close()

    asyncio.run(run())
    assert changes == []  # never serving, so no change to report


def _affine_router(n: int, **options: object) -> Router:
    router = Router(
        [f"127.0.0.1:{i + 1}" for i in range(n)],
        prefix_affinity=PrefixAffinityConfig(block_tokens=4, **options),  # type: ignore[arg-type]
    )
    for replica in router.replicas:
        replica.status = STATUS
        replica.is_healthy = True
    return router


DIALOGUE = list(range(1, 41))


def test_a_prompt_follows_its_cached_prefix_within_the_load_bound() -> None:
    async def run() -> None:
        router = _affine_router(2)
        a, b = router.replicas
        router.remember(b.address, DIALOGUE[:24])
        # b holds 24 of the 40 tokens: it gets the prompt though a is less loaded.
        with router.track(b, 30):
            assert router.choose(prompt_ids=DIALOGUE) is b
        # Past the bound (outstanding above 1.25x the mean, this prompt counted) it
        # goes to the least loaded replica, which can fetch the prefix from b.
        with router.track(b, 100):
            assert router.choose(prompt_ids=DIALOGUE) is a
            assert router.prefix_source(DIALOGUE, a) == b.address
        assert router.prefix_source(DIALOGUE, b) == ""
        # A session's replica comes first.
        router.bind("s", a.address)
        assert router.choose("s", DIALOGUE) is a
        await router.close()

    asyncio.run(run())


def test_a_prefix_every_replica_holds_leaves_routing_to_load() -> None:
    async def run() -> None:
        router = _affine_router(3)
        a, b, c = router.replicas
        template = DIALOGUE[:16]
        for replica in router.replicas:
            router.remember(replica.address, template)
        with router.track(a, 10), router.track(c, 5):
            assert router.choose(prompt_ids=[*template, 90, 91, 92, 93]) is b
        # Only a holds the longer prefix, but it is loaded past the bound.
        router.remember(a.address, DIALOGUE)
        with router.track(a, 200), router.track(b, 20):
            assert router.choose(prompt_ids=DIALOGUE) is c
        await router.close()

    asyncio.run(run())


def test_prefix_affinity_can_be_turned_off() -> None:
    async def run() -> None:
        router = _affine_router(2, enabled=False)
        a, b = router.replicas
        router.remember(b.address, DIALOGUE)
        with router.track(b, 1):
            assert router.choose(prompt_ids=DIALOGUE) is a
        assert router.prefix_source(DIALOGUE, a) == ""
        await router.close()

    asyncio.run(run())
