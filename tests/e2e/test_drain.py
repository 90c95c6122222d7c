"""Graceful drain on SIGTERM, with real processes (`shardwire shard` + `shardwire
gateway`): streams in flight finish, new calls are refused with UNAVAILABLE while
health says NOT_SERVING, and the process exits 0; --drain-timeout bounds the wait.
A replica leader on SIGTERM finishes its requests too, then releases its ranks."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from clients.client import Client
from serve.launch import free_port, wait_serving
from tests.fixtures.processes import kill_tree, start_cli
from tests.fixtures.streams import ClientStream

NUM_STREAMS = 10
# Tokens per stream: a few seconds of decoding for ten streams on two shared cores.
LONG = 800


def _start_shard(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = start_cli(["shard", "--port", str(port), "--kv-cache-mb", "32", "--num-threads", "1",
                   "--metrics-port", "-1", *extra])  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(target, 60, proc))
    except BaseException:
        kill_tree(proc)
        raise
    return proc, target


@pytest.fixture(scope="module")
def shard() -> Iterator[str]:
    proc, target = _start_shard()
    yield target
    kill_tree(proc)


@pytest.fixture
def gateway_factory(shard: str) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(drain_timeout_s: float, replica: str = shard) -> tuple[subprocess.Popen, str]:
        port = free_port()
        drain = str(drain_timeout_s)
        proc = start_cli(["gateway", "--port", str(port), "--replica", replica,
                       "--drain-timeout", drain, "--metrics-port", "-1"])  # fmt: skip
        procs.append(proc)
        target = f"127.0.0.1:{port}"
        asyncio.run(wait_serving(target, 60, proc))
        return proc, target

    yield start
    for proc in procs:
        kill_tree(proc)


def _open_streams(target: str, max_tokens: int) -> list[ClientStream]:
    streams = [
        ClientStream(target, i, max_tokens, timeout_s=60).start() for i in range(NUM_STREAMS)
    ]
    for s in streams:
        assert s.started.wait(30), "a stream did not start"
    assert all(s.finish_reason is None and s.code == "OK" for s in streams), "streams too short"
    return streams


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _probe(target: str) -> subprocess.CompletedProcess:
    """`shardwire probe`, the container health check, against the gateway."""
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", "probe", "--target", target, "--service",
         "shardwire.v1.Inference"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _wait_health(target: str, status: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _health(target) != status:
        assert time.monotonic() < deadline, f"health is not {status} after {timeout_s:g} s"
        time.sleep(0.02)


def _new_call_code(target: str) -> str:
    try:
        with Client(target, timeout=5) as client:
            list(client.generate("a new call", max_tokens=2))
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def _shard_generate_code(target: str) -> str:
    """The status of a new request straight to a replica leader's Shard API."""
    request = shard_pb2.ShardGenerateRequest(
        request_id="a-new-request",
        prompt_token_ids=[5, 6, 7],
        sampling=inference_pb2.SamplingParams(max_tokens=2),
    )
    try:
        with grpc.insecure_channel(target) as channel:
            list(shard_pb2_grpc.ShardStub(channel).Generate(request, timeout=5))
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def test_sigterm_lets_streams_in_flight_finish_and_exits_0(gateway_factory) -> None:
    proc, target = gateway_factory(drain_timeout_s=30)
    assert _probe(target).returncode == 0
    streams = _open_streams(target, max_tokens=LONG)
    proc.send_signal(signal.SIGTERM)
    _wait_health(target, "NOT_SERVING")
    assert proc.poll() is None, "the gateway left before its streams finished"
    assert _new_call_code(target) == "UNAVAILABLE"
    probe = _probe(target)
    assert probe.returncode == 1 and "NOT_SERVING" in probe.stderr, probe.stderr
    assert any(s.finish_reason is None for s in streams), "streams too short to see the drain"
    assert proc.wait(timeout=45) == 0
    exited_at = time.monotonic()
    for s in streams:
        s.thread.join(5)  # type: ignore[union-attr]
        assert (s.code, s.finish_reason, s.num_tokens) == ("OK", "length", LONG)
        assert s.ended_at <= exited_at
    assert _new_call_code(target) == "UNAVAILABLE"  # nothing listens any more


def test_drain_timeout_bounds_the_wait(gateway_factory) -> None:
    proc, target = gateway_factory(drain_timeout_s=1)
    streams = _open_streams(target, max_tokens=2000)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    took = time.monotonic() - signalled
    assert took < 6, f"exited {took:.1f} s after SIGTERM with a 1 s drain timeout"
    for s in streams:
        s.thread.join(10)  # type: ignore[union-attr]
        # Cut short: an error status, never a normal finish.
        assert s.code != "OK" and s.finish_reason is None, (s.code, s.finish_reason)


def test_leader_sigterm_finishes_its_requests_then_exits_0(gateway_factory) -> None:
    shard_proc, shard_target = _start_shard("--drain-timeout", "30")
    try:
        _, target = gateway_factory(drain_timeout_s=30, replica=shard_target)
        streams = _open_streams(target, max_tokens=LONG)
        shard_proc.send_signal(signal.SIGTERM)
        _wait_health(shard_target, "NOT_SERVING")
        assert shard_proc.poll() is None, "the leader left before its requests finished"
        assert _shard_generate_code(shard_target) == "UNAVAILABLE"
        assert any(s.finish_reason is None for s in streams), "streams too short"
        assert shard_proc.wait(timeout=45) == 0
        for s in streams:
            s.thread.join(5)  # type: ignore[union-attr]
            assert (s.code, s.finish_reason, s.num_tokens) == ("OK", "length", LONG)
        # The only replica is gone: the gateway refuses with UNAVAILABLE.
        assert _new_call_code(target) == "UNAVAILABLE"
    finally:
        kill_tree(shard_proc)
