"""Shard failure under `shardwire up --replicas 2 --tp 2`, with light load on the
gateway: a rank 1 that is killed (SIGKILL) or hung (SIGSTOP) takes its replica
out of service within seconds, no request outlives its deadline, failures are
UNAVAILABLE only, requests started once the replica is out all succeed, and the
supervisor brings the whole TP group back (new processes, same port) without help.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from clients.client import Client
from serve.config import CLUSTER_SECRET_ENV
from serve.gateway.auth import CLUSTER_SECRET_HEADER
from serve.launch import free_port, wait_serving

CLI = [sys.executable, "-m", "serve.cli"]
TP_TIMEOUT_S = 5
DEADLINE_S = 20.0
NUM_WORKERS = 3
# Given to `up` (through the environment), so the test can call a replica directly.
CLUSTER_SECRET = "failure-test-cluster-secret"


@dataclass
class Up:
    target: str
    proc: subprocess.Popen
    log: Path

    def ranks(self) -> dict[int, dict[int, int]]:
        """{replica gRPC port: {rank: pid}} of the launcher's children now."""
        children = " ".join(
            p.read_text() for p in Path(f"/proc/{self.proc.pid}/task").glob("*/children")
        ).split()
        groups: dict[int, dict[int, int]] = {}
        for pid in children:
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:  # exited meanwhile
                continue
            if "shard" not in args:
                continue
            port = int(args[args.index("--port") + 1])
            rank = int(args[args.index("--tp-rank") + 1])
            groups.setdefault(port, {})[rank] = int(pid)
        return groups


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    port = free_port()
    log = tmp_path_factory.mktemp("failure") / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "--log-level", "info", "up", "--port", str(port), "--replicas", "2",
             "--tp", "2", "--tp-timeout", str(TP_TIMEOUT_S), "--kv-cache-mb", "16",
             "--num-threads", "1", "--metrics-port", "-1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, CLUSTER_SECRET_ENV: CLUSTER_SECRET},
        )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(target, 120, proc))
        deployment = Up(target, proc, log)
        _wait(lambda: len(deployment.ranks()) == 2, 10, "two replica groups")
        yield deployment
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass(frozen=True)
class Outcome:
    start: float
    end: float
    code: str  # "OK" or a status code name
    num_tokens: int


@dataclass
class Load:
    """NUM_WORKERS threads sending short generations back to back until stopped."""

    target: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i in range(NUM_WORKERS):
            thread = threading.Thread(target=self._work, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(DEADLINE_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a request outlived its deadline"

    def _work(self, worker: int) -> None:
        with Client(self.target, timeout=DEADLINE_S) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                start, tokens, code = time.monotonic(), 0, "OK"
                try:
                    stream = client.generate(
                        f"worker {worker} request {n}", max_tokens=24, ignore_eos=True, seed=n
                    )
                    for chunk in stream:
                        tokens += len(chunk.token_ids)
                except grpc.RpcError as err:
                    code = err.code().name
                self.outcomes.append(Outcome(start, time.monotonic(), code, tokens))


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until predicate() held; fails the test after timeout_s."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"no {what} within {timeout_s:g} s"
        time.sleep(0.1)
    return time.monotonic() - start


def _num_healthy(target: str) -> int:
    with Client(target, timeout=2) as client:
        return client.list_models()[0].num_replicas


def _generate_on_replica(port: int) -> list[int]:
    """A request straight to the replica's Shard API (the TP group runs a forward)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        request = shard_pb2.ShardGenerateRequest(
            request_id=f"direct-{port}",
            prompt_token_ids=[5, 6, 7, 8],
            sampling=inference_pb2.SamplingParams(max_tokens=8, ignore_eos=True, temperature=0),
        )
        metadata = ((CLUSTER_SECRET_HEADER, CLUSTER_SECRET),)
        stream = stub.Generate(request, timeout=20, metadata=metadata)
        return [t for chunk in stream for t in chunk.token_ids]


def _fail_and_recover(up: Up, port: int, sig: signal.Signals, detect_within_s: float) -> None:
    before = up.ranks()[port]
    _wait(lambda: _num_healthy(up.target) == 2, 60, "two healthy replicas before the fault")
    with Load(up.target) as load:
        time.sleep(1.5)  # streams in flight on both replicas
        killed_at = time.monotonic()
        os.kill(before[1], sig)
        detected_s = _wait(lambda: _num_healthy(up.target) < 2, 30, "replica marked down")
        out_at = time.monotonic()
        recovered_s = _wait(lambda: _num_healthy(up.target) == 2, 90, "replica back in service")
        back_at = time.monotonic()
        time.sleep(2.0)  # traffic on both replicas again
    assert detected_s <= detect_within_s, f"down after {detected_s:.1f} s"

    after = up.ranks()[port]
    assert set(after) == {0, 1}
    assert not set(after.values()) & set(before.values()), "the whole group was restarted"
    assert not Path(f"/proc/{before[1]}").exists(), "the failed rank was reaped"

    outcomes = load.outcomes
    assert all(o.end - o.start <= DEADLINE_S + 1.0 for o in outcomes), "past a deadline"
    failed = [o for o in outcomes if o.code != "OK"]
    assert {o.code for o in failed} <= {"UNAVAILABLE"}, failed
    # Only streams running at the fault may fail; later ones went to the healthy replica.
    assert len(failed) <= NUM_WORKERS, failed
    assert all(o.code == "OK" for o in outcomes if o.start >= out_at), failed
    assert sum(o.code == "OK" and o.start >= back_at for o in outcomes) >= NUM_WORKERS
    assert len(_generate_on_replica(port)) == 8
    log = up.log.read_text()
    assert "restarting its 2 ranks" in log
    print(
        f"{sig.name}: down after {detected_s:.1f} s, back after {recovered_s:.1f} s more "
        f"(fault to back: {back_at - killed_at:.1f} s); {len(outcomes)} requests, "
        f"{len(failed)} UNAVAILABLE"
    )


def test_killed_rank_is_detected_and_its_group_restarted(up: Up) -> None:
    port = sorted(up.ranks())[0]
    _fail_and_recover(up, port, signal.SIGKILL, detect_within_s=10.0)


def test_hung_rank_is_detected_within_the_group_timeout(up: Up) -> None:
    port = sorted(up.ranks())[1]
    _fail_and_recover(up, port, signal.SIGSTOP, detect_within_s=TP_TIMEOUT_S + 5.0)
