"""SIGTERM on a replica process with another replica beside it: the gateway sees the
replica draining and moves its requests (live migration), so every client stream
completes with exactly the tokens an unmoved run gives, and the replica exits 0
long before its requests would have finished in place."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from clients.client import Client
from serve.launch import free_port, wait_serving
from tests.fixtures.processes import kill_tree, start_cli
from tests.fixtures.servers import shard_status

NUM_STREAMS = 4
LONG = 1000


@pytest.fixture
def deployment() -> Iterator[tuple[str, dict[str, subprocess.Popen]]]:
    procs: dict[str, subprocess.Popen] = {}
    gateway: subprocess.Popen | None = None
    try:
        for _ in range(2):
            port = free_port()
            procs[f"127.0.0.1:{port}"] = start_cli(
                ["shard", "--port", str(port), "--kv-cache-mb", "32", "--num-threads", "1",
                 "--metrics-port", "-1", "--drain-timeout", "60"]
            )  # fmt: skip
        port = free_port()
        gateway = start_cli(
            ["gateway", "--port", str(port), "--replica", ",".join(procs), "--metrics-port", "-1"]
        )
        target = f"127.0.0.1:{port}"
        for address, proc in procs.items():
            asyncio.run(wait_serving(address, 60, proc))
        asyncio.run(wait_serving(target, 60, gateway))
        while Client(target, timeout=5).list_models()[0].num_replicas < 2:
            time.sleep(0.1)
        yield target, procs
    finally:
        for proc in [*procs.values(), *([gateway] if gateway else [])]:
            kill_tree(proc)


@dataclass
class Stream:
    """One long greedy generation on its own thread."""

    target: str
    index: int
    max_tokens: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    code: str = "OK"
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def _run(self) -> None:
        try:
            with Client(self.target, timeout=90) as client:
                stream = client.generate(
                    f"stream {self.index}",
                    max_tokens=self.max_tokens,
                    ignore_eos=True,
                    temperature=0.0,
                )
                for chunk in stream:
                    self.token_ids.extend(chunk.token_ids)
                    self.finish_reason = chunk.finish_reason
                    self.started.set()
        except grpc.RpcError as err:
            self.code = err.code().name
        finally:
            self.started.set()


def _replica_of(address: str) -> int:
    """Requests running on a replica (its Status)."""
    status = shard_status(address)
    return status.num_running + status.num_waiting


def test_sigterm_moves_the_requests_to_the_other_replica(deployment) -> None:
    target, procs = deployment
    streams = [Stream(target, i, LONG).start() for i in range(NUM_STREAMS)]
    for s in streams:
        assert s.started.wait(30)
    busy, proc = max(procs.items(), key=lambda item: _replica_of(item[0]))
    assert _replica_of(busy) > 0
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    took = time.monotonic() - signalled
    assert any(s.finish_reason is None for s in streams), "streams too short to see the move"
    for s in streams:
        s.thread.join(60)  # type: ignore[union-attr]
        assert (s.code, s.finish_reason, s.num_tokens) == ("OK", "length", LONG)
    # The same prompts again, now all on the remaining replica: the same tokens.
    again = [Stream(target, s.index, LONG).start() for s in streams]
    for s, reference in zip(streams, again, strict=True):
        reference.thread.join(60)  # type: ignore[union-attr]
        assert reference.code == "OK" and reference.token_ids == s.token_ids
    print(f"replica left {took:.1f} s after SIGTERM; streams of {LONG} tokens completed")
