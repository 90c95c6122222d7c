"""Prefix reuse across replicas: a dialogue's next turn that lands on a replica
without the dialogue's KV fetches the cached prefix from the replica that served
the last turn (ExportKv -> local import into the prefix cache), and answers as if
it had computed it; the fetch decision follows the link model."""

from __future__ import annotations

import grpc
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from serve.comm.linkmodel import LinkModel
from serve.shard.kv_transfer import predict_fetch_s, should_fetch
from tests.fixtures.servers import servers
from tests.fixtures.streams import chat_turn

USER = "Tell me about the weather in the mountains near the lake. " * 6


def test_next_turn_on_another_replica_fetches_the_prefix() -> None:
    for s in servers():
        replicas = [s.shard(prefix_fetch="always"), s.shard(prefix_fetch="always")]
        gateway = s.gateway(replicas)
        first = [("user", USER)]
        _, answer, _ = chat_turn(gateway, first, "s1")
        served = s.gateways[0].router.bound_replica("s1")
        assert served in replicas
        # Take the replica that holds the dialogue out of rotation (it still answers).
        with grpc.insecure_channel(gateway) as channel:
            shard_pb2_grpc.AdminStub(channel).Drain(shard_pb2.DrainRequest(replica=served))
        second = [*first, ("assistant", answer), ("user", "And tomorrow?")]
        ids, _, cached = chat_turn(gateway, second, "s1")
        assert s.gateways[0].router.bound_replica("s1") != served
        assert cached >= 64, f"only {cached} prompt tokens came from a cache"
        # The same turn on a replica that computes everything itself.
        fresh = s.gateway([s.shard(prefix_fetch="never")])
        reference, _, fresh_cached = chat_turn(fresh, second, "s1")
        assert fresh_cached == 0
        assert ids == reference


def test_the_link_model_decides_between_fetching_and_recomputing() -> None:
    slow = LinkModel(alpha_s=1e-3, beta_bytes_per_s=100e6 / 8)  # 100 Mbit/s
    fast = LinkModel(alpha_s=1e-4, beta_bytes_per_s=10e9 / 8)
    numel = 4096 * 12 * 2 * 4 * 64  # 4k tokens of the small preset's KV
    cpu_prefill_s = 4096 * 3e-3  # 3 ms a token
    gpu_prefill_s = 4096 * 3e-6
    codec_cost = 5e-9  # seconds per element to encode (and to decode)
    none_s = predict_fetch_s(slow, numel, 4, 1.0, 1e-10, 1e-10)
    int4_s = predict_fetch_s(slow, numel, 4, 0.1, codec_cost, codec_cost)
    assert 7.5 < none_s < 8.5  # 100 MB at 100 Mbit/s
    assert int4_s < none_s / 5
    assert should_fetch(int4_s, cpu_prefill_s) and should_fetch(none_s, cpu_prefill_s)
    # A GPU prefill beats moving fp32 KV over 100 Mbit/s (even int4) and over 10 Gbit/s.
    assert not should_fetch(int4_s, gpu_prefill_s)
    fast_s = predict_fetch_s(fast, numel, 4, 1.0, 1e-12, 1e-12)
    assert 0.07 < fast_s < 0.09
    assert should_fetch(fast_s, cpu_prefill_s) and not should_fetch(fast_s, gpu_prefill_s)
