"""Prefix affinity without sessions: a client that resends the whole dialogue each
turn (no session_id) gets its next turn routed to the replica that served the
last one, and answered from that replica's prefix cache; when that replica is out
of rotation the turn lands elsewhere and fetches the prefix from it."""

from __future__ import annotations

import grpc
import pytest
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from serve.config import PrefixAffinityConfig
from tests.fixtures.servers import Servers, servers
from tests.fixtures.streams import Stream, chat_turn

USER = "Describe the harbour at dawn, the boats, the gulls and the fish market. " * 5


def _first_turn_on_the_second_replica(s: Servers, gateway: str) -> tuple[list, str]:
    """Runs the first turn while a long stream keeps the first replica (the one an
    idle gateway picks) busy, so least-load routing alone would pick the other one
    for the next turn. Returns the next turn's messages and the served replica."""
    router = s.gateways[-1].router
    first, other = router.replicas
    blocker = Stream(gateway, [5, 6, 7], max_tokens=1500).start()
    assert blocker.started.wait(30)
    assert first.num_active == 1
    messages = [("user", USER)]
    _, answer, _ = chat_turn(gateway, messages)
    assert blocker.join().code == "OK"
    return [*messages, ("assistant", answer), ("user", "And at noon?")], other.address


@pytest.mark.parametrize("affinity", [True, False], ids=["affinity", "load-only"])
def test_the_next_turn_follows_the_dialogue_prefix(affinity: bool) -> None:
    for s in servers():
        replicas = [s.shard(prefix_fetch="never"), s.shard(prefix_fetch="never")]
        gateway = s.gateway(replicas, prefix_affinity=PrefixAffinityConfig(enabled=affinity))
        second, holder = _first_turn_on_the_second_replica(s, gateway)
        assert holder == replicas[1]
        ids, _, cached = chat_turn(gateway, second)
        # The replicas fetch no prefix: a cached prompt means the turn went to holder.
        router = s.gateways[-1].router
        if affinity:
            assert cached >= 64, f"only {cached} prompt tokens came from a cache"
            assert router.decisions["prefix"] == 1
        else:
            assert router.decisions["prefix"] == 0
            # Both replicas idle: load alone picks the first one, which has nothing.
            assert cached == 0
        reference, _, _ = chat_turn(s.gateway([s.shard(prefix_fetch="never")]), second)
        assert ids == reference


def test_a_turn_away_from_the_prefix_fetches_it_from_its_holder() -> None:
    for s in servers():
        replicas = [s.shard(prefix_fetch="always"), s.shard(prefix_fetch="always")]
        gateway = s.gateway(replicas)
        second, holder = _first_turn_on_the_second_replica(s, gateway)
        # Out of rotation (it still answers ExportKv).
        with grpc.insecure_channel(gateway) as channel:
            shard_pb2_grpc.AdminStub(channel).Drain(shard_pb2.DrainRequest(replica=holder))
        ids, _, cached = chat_turn(gateway, second)
        assert cached >= 64, f"only {cached} prompt tokens came from a cache"
        reference, _, fresh_cached = chat_turn(s.gateway([s.shard(prefix_fetch="never")]), second)
        assert fresh_cached == 0 and ids == reference


def test_a_replica_seen_again_after_a_failure_is_forgotten() -> None:
    for s in servers():
        replicas = [s.shard(prefix_fetch="never"), s.shard(prefix_fetch="never")]
        s.gateway(replicas)
        router = s.gateways[-1].router
        assert router.prefixes is not None
        prompt = list(range(1, 65))
        for address in replicas:
            router.remember(address, prompt)
        router.replicas[0].mark_unhealthy("test")
        s.run(router.refresh())  # it answers again: it may have restarted empty
        assert router.replicas[0].is_healthy
        assert router.prefixes.cached_tokens(prompt) == {replicas[1]: 64}
