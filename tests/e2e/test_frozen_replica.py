"""A replica that freezes (SIGSTOP: its TCP connections stay open, nothing answers)
while it streams: the gateway's keepalive pings go unanswered, so the stream ends
with UNAVAILABLE within seconds instead of hanging, and new requests go to the
other replica; a prefill replica that freezes mid hand-over leaves its request to
the decode replica. `shardwire shard` processes behind an in-process gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from clients.client import Client
from serve.config import EngineConfig, ShardConfig
from serve.launch import free_port, wait_serving
from serve.shard.app import start_shard
from tests.fixtures.processes import kill_tree, start_cli
from tests.fixtures.servers import servers


def _stream(target: str, max_tokens: int, out: list) -> None:
    num_tokens = 0
    try:
        with Client(target, timeout=120) as client:
            for chunk in client.generate("frozen", max_tokens=max_tokens, ignore_eos=True):
                num_tokens += len(chunk.token_ids)
        out.append((num_tokens, "OK", time.monotonic()))
    except grpc.RpcError as err:
        out.append((num_tokens, err.code().name, time.monotonic()))


def test_a_frozen_replica_fails_its_stream_instead_of_hanging() -> None:
    ports = [free_port(), free_port()]
    procs = [
        start_cli(["shard", "--port", str(p), "--kv-cache-mb", "16", "--metrics-port", "-1"])
        for p in ports
    ]
    frozen = None
    try:
        addresses = [f"127.0.0.1:{p}" for p in ports]
        for address, proc in zip(addresses, procs, strict=True):
            asyncio.run(wait_serving(address, 120, proc))
        for s in servers():
            gateway = s.gateway(addresses, replica_keepalive_s=1.0, replica_keepalive_timeout_s=1.0)
            replicas = s.gateways[-1].router.replicas
            result: list = []
            thread = threading.Thread(target=_stream, args=(gateway, 4000, result))
            thread.start()
            deadline = time.monotonic() + 30
            while not any(r.num_active for r in replicas):
                assert time.monotonic() < deadline, "the stream never started"
                time.sleep(0.01)
            busy = next(i for i, r in enumerate(replicas) if r.num_active)
            time.sleep(0.5)  # tokens are flowing
            frozen = procs[busy]
            os.kill(frozen.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            thread.join(30)
            num_tokens, code, ended_at = result[0]
            assert code == "UNAVAILABLE", (num_tokens, code)
            assert 0 < num_tokens < 4000
            assert ended_at - stopped_at < 10, f"ended {ended_at - stopped_at:.1f} s after"
            # The gateway serves on from the other replica.
            later: list = []
            _stream(gateway, 8, later)
            assert later[0][:2] == (8, "OK")
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        for proc in procs:
            kill_tree(proc)


def test_a_prefill_replica_frozen_mid_hand_over_fails_over_to_its_decode_replica() -> None:
    """The prefill replica freezes while it prefills (its KV push to the decode
    replica already begun, so the request id is staged there): the request, which
    has no token yet, moves to the decode replica, which ends the stalled import
    and serves it whole."""
    port = free_port()
    prefill = start_cli(
        ["shard", "--model", "small", "--port", str(port), "--role", "prefill",
         "--num-threads", "1", "--kv-cache-mb", "64", "--metrics-port", "-1"]
    )  # fmt: skip
    try:
        asyncio.run(wait_serving(f"127.0.0.1:{port}", 120, prefill))
        for s in servers():
            engine = EngineConfig(kv_cache_bytes=64 * 1024 * 1024)
            config = ShardConfig(port=0, model="small", engine=engine, role="decode")
            decode = s.run(start_shard(config), 120)
            s.shards.append(decode)
            gateway = s.gateway(
                [f"127.0.0.1:{port}", f"127.0.0.1:{decode.port}"],
                model="small",
                replica_keepalive_s=1.0,
                replica_keepalive_timeout_s=1.0,
                status_poll_interval_s=600.0,
            )
            result: list = []
            prompt = [(7 * i) % 200 + 32 for i in range(2000)]
            thread = threading.Thread(target=_generate_ids, args=(gateway, prompt, result))
            thread.start()
            importing = decode.servicer.kv._importing  # type: ignore[union-attr]
            deadline = time.monotonic() + 60
            while not importing:
                assert time.monotonic() < deadline, "the hand-over never began"
                time.sleep(0.005)
            os.kill(prefill.pid, signal.SIGSTOP)
            thread.join(60)
            assert result == [(16, "OK")], result
            assert not importing
    finally:
        os.kill(prefill.pid, signal.SIGCONT)
        kill_tree(prefill)


def _generate_ids(target: str, prompt: list[int], out: list) -> None:
    request = inference_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=inference_pb2.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    )
    num_tokens = 0
    try:
        with grpc.insecure_channel(target) as channel:
            for chunk in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60):
                num_tokens += len(chunk.token_ids)
        out.append((num_tokens, "OK"))
    except grpc.RpcError as err:
        out.append((num_tokens, f"{err.code().name}: {err.details()}"))
