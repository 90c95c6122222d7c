"""SIGTERM on a replica process with another replica beside it: the gateway sees the
replica draining and moves its requests (live migration), so every client stream
completes with exactly the tokens an unmoved run gives, and the replica exits 0
long before its requests would have finished in place."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from clients.client import Client
from serve.launch import free_port, wait_serving
from tests.fixtures.processes import kill_tree, start_cli
from tests.fixtures.servers import shard_status
from tests.fixtures.streams import ClientStream

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


def _replica_of(address: str) -> int:
    """Requests running on a replica (its Status)."""
    status = shard_status(address)
    return status.num_running + status.num_waiting


def test_sigterm_moves_the_requests_to_the_other_replica(deployment) -> None:
    target, procs = deployment
    streams = [ClientStream(target, i, LONG, temperature=0.0).start() for i in range(NUM_STREAMS)]
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
    again = [ClientStream(target, s.index, LONG, temperature=0.0).start() for s in streams]
    for s, reference in zip(streams, again, strict=True):
        reference.thread.join(60)  # type: ignore[union-attr]
        assert reference.code == "OK" and reference.token_ids == s.token_ids
    print(f"replica left {took:.1f} s after SIGTERM; streams of {LONG} tokens completed")
