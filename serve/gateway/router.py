"""Replica clients and the choice of replica for each request.

Each `ReplicaClient` keeps a gRPC channel to one replica leader, its last
`Shard.Status` and the tokens of the requests it is serving for us. `Router`
polls the replicas and sends a request to the healthy one with the fewest
outstanding tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from serve.errors import Unavailable

logger = logging.getLogger(__name__)

HealthListener = Callable[[bool], Awaitable[None]]


@dataclass(frozen=True)
class ReplicaStatus:
    """A replica's model and load, from `Shard.Status`."""

    model: str
    tp_size: int
    dtype: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    kv_blocks_free: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int

    @classmethod
    def from_proto(cls, msg: shard_pb2.StatusResponse) -> ReplicaStatus:
        return cls(
            model=msg.model,
            tp_size=msg.tp_size,
            dtype=msg.dtype,
            vocab_size=msg.vocab_size,
            max_model_len=msg.max_model_len,
            eos_token_ids=tuple(msg.eos_token_ids),
            kv_blocks_free=msg.kv_blocks_free,
            kv_blocks_total=msg.kv_blocks_total,
            num_running=msg.num_running,
            num_waiting=msg.num_waiting,
        )


class ReplicaClient:
    """The gateway's connection to one replica leader."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        self.status: ReplicaStatus | None = None
        self.is_healthy = False
        self.outstanding_tokens = 0
        self.num_active = 0

    async def refresh(self, timeout_s: float) -> bool:
        """Asks the replica for its status; returns whether it answered."""
        try:
            msg = await self._stub.Status(shard_pb2.StatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            self.mark_unhealthy(f"{err.code().name}: {err.details()}")
            return False
        self.status = ReplicaStatus.from_proto(msg)
        if not self.is_healthy:
            logger.info("replica %s is healthy (model %s)", self.address, self.status.model)
        self.is_healthy = True
        return True

    def mark_unhealthy(self, reason: str) -> None:
        if self.is_healthy:
            logger.warning("replica %s is unhealthy: %s", self.address, reason)
        self.is_healthy = False

    def generate(
        self, request: shard_pb2.ShardGenerateRequest, timeout_s: float | None
    ) -> grpc.aio.UnaryStreamCall:
        """Starts `Shard.Generate`; cancelling the returned call aborts the request."""
        return self._stub.Generate(request, timeout=timeout_s)

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool:
        request = shard_pb2.AbortRequest(request_id=request_id)
        msg = await self._stub.Abort(request, timeout=timeout_s)
        return msg.found

    async def close(self) -> None:
        await self._channel.close()


class Lease:
    """One request's share of a replica's outstanding tokens, shrinking as tokens arrive."""

    def __init__(self, replica: ReplicaClient, num_tokens: int) -> None:
        self.replica = replica
        self.remaining = num_tokens

    def consume(self, num_tokens: int) -> None:
        used = min(num_tokens, self.remaining)
        self.remaining -= used
        self.replica.outstanding_tokens -= used


class Router:
    """Chooses a replica per request and tracks replica health."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        poll_interval_s: float = 1.0,
        status_timeout_s: float = 2.0,
        on_health_change: HealthListener | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one replica address is needed")
        self.replicas = tuple(ReplicaClient(a) for a in addresses)
        self._poll_interval_s = poll_interval_s
        self._status_timeout_s = status_timeout_s
        self._on_health_change = on_health_change
        self._was_serving = False
        self._poll_task: asyncio.Task[None] | None = None

    @property
    def is_serving(self) -> bool:
        return any(r.is_healthy for r in self.replicas)

    def healthy_replicas(self) -> list[ReplicaClient]:
        return [r for r in self.replicas if r.is_healthy and r.status is not None]

    async def refresh(self) -> None:
        await asyncio.gather(*(r.refresh(self._status_timeout_s) for r in self.replicas))
        await self._notify()

    async def start(self) -> None:
        """Polls every replica once, then keeps polling in the background."""
        await self.refresh()
        self._poll_task = asyncio.create_task(self._poll(), name="shardwire-router-poll")

    async def wait_ready(self, timeout_s: float) -> None:
        """Waits until a replica answers Status; Unavailable after timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.healthy_replicas():
            if loop.time() >= deadline:
                addresses = ", ".join(r.address for r in self.replicas)
                raise Unavailable(f"no replica answered within {timeout_s:g} s ({addresses})")
            await asyncio.sleep(min(0.1, self._poll_interval_s))
            await self.refresh()

    def choose(self, session_id: str = "") -> ReplicaClient:
        """The healthy replica with the fewest outstanding tokens.

        `session_id` is accepted for session affinity, which is not applied yet."""
        del session_id
        healthy = self.healthy_replicas()
        if not healthy:
            raise Unavailable("no healthy replica")
        return min(healthy, key=lambda r: (r.outstanding_tokens, r.num_active))

    @contextlib.contextmanager
    def track(self, replica: ReplicaClient, num_tokens: int) -> Iterator[Lease]:
        """Counts a request's tokens against the replica while it runs."""
        lease = Lease(replica, num_tokens)
        replica.outstanding_tokens += num_tokens
        replica.num_active += 1
        try:
            yield lease
        finally:
            replica.outstanding_tokens -= lease.remaining
            replica.num_active -= 1

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await asyncio.gather(*(r.close() for r in self.replicas))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("replica status poll failed")

    async def _notify(self) -> None:
        serving = self.is_serving
        if serving != self._was_serving:
            self._was_serving = serving
            if self._on_health_change is not None:
                await self._on_health_change(serving)
