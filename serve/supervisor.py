"""Keeps the replicas of `shardwire up` alive.

Each replica is a tensor-parallel group of child processes (rank 0 leads). A group
is only whole with every rank: when any rank exits (a leader exits 1 once a peer
died or hung past the process-group timeout, a rank > 0 once its leader is gone),
the supervisor kills the ranks still running (SIGKILL, which also ends a stopped
one), waits a backoff, and starts every rank again on the same gRPC port with a
fresh master port, so a half-dead old group can never be joined. The gateway
polls the port and takes the replica back once it reports SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.errors import Unavailable

logger = logging.getLogger(__name__)

# Starts every rank of one group (rank order; the leader first) on a fresh master port.
SpawnGroup = Callable[[], list[subprocess.Popen]]


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast failed replica groups come back."""

    enabled: bool = True
    # Wait before the n-th restart in a row: initial * 2^(n-1), at most max.
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    # A group serving this long since its last restart starts again from the initial backoff.
    stable_after_s: float = 60.0
    # How often the children are looked at.
    poll_interval_s: float = 0.2


class ReplicaGroup:
    """The rank processes of one replica, started and killed as a whole."""

    def __init__(self, index: int, target: str, spawn: SpawnGroup) -> None:
        self.index = index
        self.target = target
        self._spawn = spawn
        self.procs: list[subprocess.Popen] = spawn()
        self.num_restarts = 0
        # Failures since the group was last stable (drives the backoff).
        self.num_failures = 0
        self.serving_since: float | None = None

    @property
    def leader(self) -> subprocess.Popen:
        return self.procs[0]

    def exited(self) -> list[tuple[int, int | None]]:
        """(rank, exit code) of each rank that is no longer running."""
        return [(rank, p.returncode) for rank, p in enumerate(self.procs) if p.poll() is not None]

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL to every rank still running, then reaps them all."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=timeout_s)

    def respawn(self) -> None:
        """Starts every rank again. Runs on the thread that started the first group:
        the children's parent-death signal is tied to that thread."""
        self.procs = self._spawn()


async def wait_group_serving(group: ReplicaGroup, timeout_s: float) -> None:
    """Polls the leader's grpc.health.v1 until SERVING; Unavailable if a rank exits
    first or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(group.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            exited = group.exited()
            if exited:
                rank, code = exited[0]
                raise Unavailable(f"rank {rank} of {group.target} exited with code {code}")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise Unavailable(f"{group.target} not SERVING after {timeout_s:.0f} s")


class Supervisor:
    """Watches replica groups and restarts a group when any of its ranks exits."""

    def __init__(
        self, groups: list[ReplicaGroup], policy: RestartPolicy, start_timeout_s: float
    ) -> None:
        self.groups = groups
        self.policy = policy
        self.start_timeout_s = start_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._restarts: dict[int, asyncio.Task[None]] = {}

    def start(self) -> None:
        now = time.monotonic()
        for group in self.groups:
            group.serving_since = now
        if self.policy.enabled:
            self._task = asyncio.create_task(self._watch(), name="shardwire-supervisor")

    async def stop(self) -> None:
        """Stops watching; a restart under way is abandoned (its ranks stay for the caller)."""
        tasks = [t for t in (self._task, *self._restarts.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None

    async def _watch(self) -> None:
        p = self.policy
        while True:
            await asyncio.sleep(p.poll_interval_s)
            now = time.monotonic()
            for group in self.groups:
                if group.index in self._restarts:
                    continue
                exited = group.exited()
                if exited:
                    task = asyncio.create_task(self._restart(group, exited))
                    self._restarts[group.index] = task
                elif (
                    group.num_failures
                    and group.serving_since is not None
                    and now - group.serving_since >= p.stable_after_s
                ):
                    group.num_failures = 0

    def backoff_s(self, num_failures: int) -> float:
        p = self.policy
        return min(p.max_backoff_s, p.initial_backoff_s * 2 ** max(num_failures - 1, 0))

    async def _restart(self, group: ReplicaGroup, exited: list[tuple[int, int | None]]) -> None:
        try:
            while True:
                group.num_failures += 1
                group.serving_since = None
                delay = self.backoff_s(group.num_failures)
                what = ", ".join(
                    f"rank {rank} exited with code {code}"
                    if code is not None
                    else f"rank {rank} did not report SERVING in time"
                    for rank, code in exited
                )
                logger.warning(
                    "replica %d (%s): %s; restarting its %d ranks in %.1f s (failure %d)",
                    group.index,
                    group.target,
                    what,
                    len(group.procs),
                    delay,
                    group.num_failures,
                )
                await asyncio.to_thread(group.kill)
                await asyncio.sleep(delay)
                group.respawn()
                try:
                    await wait_group_serving(group, self.start_timeout_s)
                except Unavailable as exc:
                    logger.warning("replica %d did not come back: %s", group.index, exc)
                    exited = list(group.exited()) or [(0, None)]
                    continue
                group.num_restarts += 1
                group.serving_since = time.monotonic()
                logger.info(
                    "replica %d (%s) is serving again (restart %d)",
                    group.index,
                    group.target,
                    group.num_restarts,
                )
                return
        finally:
            self._restarts.pop(group.index, None)
