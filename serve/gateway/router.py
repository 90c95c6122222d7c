"""Replica clients and the choice of replica for each request.

Each `ReplicaClient` keeps a gRPC channel to one replica leader, its last
`Shard.Status` and the tokens of the requests it is serving for us. `Router`
polls the replicas and sends a request to the replica that served its session's
last turn, else to the one that probably holds its prompt's prefix while that one
is not overloaded (`PrefixIndex`, bounded load), else to the healthy one with the
fewest outstanding tokens.

A replica is healthy while it answers `Status` and its grpc.health.v1 status for
`shardwire.v1.Shard` is SERVING (a leader whose TP group broke, or that drains,
turns NOT_SERVING before it goes). A request that fails with UNAVAILABLE before
its first token moves to another healthy replica (`FailoverCall`); one that has
streamed tokens ends with the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from serve.config import PrefixAffinityConfig, TLSClientConfig
from serve.errors import Unavailable
from serve.gateway.auth import secret_metadata
from serve.gateway.prefix_index import PrefixIndex
from serve.gateway.tls import channel_credentials, channel_options

if TYPE_CHECKING:
    from serve.gateway.migration import Flight

logger = logging.getLogger(__name__)

HealthListener = Callable[[bool], Awaitable[None]]
# Opens the channel to the replica at an address.
ChannelFactory = Callable[[str], grpc.aio.Channel]
# Sessions whose replica the router remembers for affinity.
MAX_AFFINITY_SESSIONS = 65536

SHARD_SERVICE = "shardwire.v1.Shard"
# A restarted replica is seen again within about a poll interval plus this.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Pings however long the calls stay silent (a long prefill sends nothing).
    ("grpc.http2.max_pings_without_data", 0),
)
# A connection with calls in flight that stays silent this long is pinged, and
# closed when a ping (this one, or one gRPC sends to size its window) is not
# answered in time: the calls on a replica that froze or lost its link (with the
# TCP connection still open) fail instead of hanging.
KEEPALIVE_S = 10.0
KEEPALIVE_TIMEOUT_S = 20.0
# What a replica's server accepts (pings more often than this close a connection).
MIN_PING_INTERVAL_MS = 500


def replica_channels(
    tls: TLSClientConfig | None = None,
    cluster_secret: str = "",
    extra_options: Sequence[tuple[str, int | str]] = (),
    keepalive_s: float = KEEPALIVE_S,
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
) -> ChannelFactory:
    """Channels to replicas: TLS when `tls` is on (plaintext otherwise), the
    cluster secret on every call when one is set, and keepalive pings."""
    tls = tls or TLSClientConfig()
    credentials = channel_credentials(tls)
    keepalive = [
        ("grpc.keepalive_time_ms", max(round(keepalive_s * 1000), MIN_PING_INTERVAL_MS)),
        ("grpc.keepalive_timeout_ms", max(round(keepalive_timeout_s * 1000), 1)),
        ("grpc.http2.ping_timeout_ms", max(round(keepalive_timeout_s * 1000), 1)),
    ]
    options = [*CHANNEL_OPTIONS, *keepalive, *channel_options(tls), *extra_options]
    interceptors = secret_metadata(cluster_secret) if cluster_secret else None

    def open_channel(address: str) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address, options, interceptors=interceptors)
        return grpc.aio.secure_channel(address, credentials, options, interceptors=interceptors)

    return open_channel


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
    # both, prefill or decode (disaggregated prefill); draining: it wants its requests moved.
    role: str = "both"
    draining: bool = False

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
            role=msg.role or "both",
            draining=msg.draining,
        )


class ReplicaClient:
    """The gateway's connection to one replica leader."""

    def __init__(self, address: str, open_channel: ChannelFactory | None = None) -> None:
        self.address = address
        self._channel = (open_channel or replica_channels())(address)
        self._stub = shard_pb2_grpc.ShardStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.status: ReplicaStatus | None = None
        self.is_healthy = False
        self.outstanding_tokens = 0
        self.num_active = 0
        # Set by the Router: another healthy replica, not one of the given addresses.
        self.find_alternative: Callable[[Collection[str]], ReplicaClient | None] | None = None
        # Out of rotation by an operator (Admin.Drain) though it may still serve.
        self.is_cordoned = False
        # Called once when the replica starts draining (SIGTERM), to move its requests.
        self.on_draining: Callable[[ReplicaClient], None] | None = None

    async def refresh(self, timeout_s: float) -> bool:
        """Asks the replica for its status and health; returns whether it can serve."""
        try:
            msg, serving = await asyncio.gather(
                self._stub.Status(shard_pb2.StatusRequest(), timeout=timeout_s),
                self._is_serving(timeout_s),
            )
        except grpc.aio.AioRpcError as err:
            self.mark_unhealthy(f"{err.code().name}: {err.details()}")
            return False
        status = ReplicaStatus.from_proto(msg)
        was_draining = self.status is not None and self.status.draining
        if status.draining and not was_draining and self.on_draining is not None:
            self.on_draining(self)
        if not serving:
            self.status = status if status.draining else self.status
            self.mark_unhealthy("health NOT_SERVING")
            return False
        self.status = status
        if not self.is_healthy:
            logger.info("replica %s is healthy (model %s)", self.address, self.status.model)
        self.is_healthy = True
        return True

    def mark_unhealthy(self, reason: str) -> None:
        if self.is_healthy:
            logger.warning("replica %s is unhealthy: %s", self.address, reason)
        self.is_healthy = False

    async def _is_serving(self, timeout_s: float) -> bool:
        """The replica's health for the Shard service (a server without health: True)."""
        request = health_pb2.HealthCheckRequest(service=SHARD_SERVICE)
        try:
            msg = await self._health.Check(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNIMPLEMENTED:
                return True
            raise
        return msg.status == health_pb2.HealthCheckResponse.SERVING

    def generate(
        self, request: shard_pb2.ShardGenerateRequest, timeout_s: float | None
    ) -> FailoverCall:
        """Starts `Shard.Generate`; cancelling the returned call aborts the request.
        Iterate it like the gRPC call; it moves to another replica if this one
        fails with UNAVAILABLE before the first token."""
        return FailoverCall(self, request, timeout_s)

    def start_generate(
        self, request: shard_pb2.ShardGenerateRequest, timeout_s: float | None
    ) -> grpc.aio.UnaryStreamCall:
        """`Shard.Generate` on this replica only."""
        return self._stub.Generate(request, timeout=timeout_s)

    def resume(self, request_id: str, timeout_s: float | None) -> grpc.aio.UnaryStreamCall:
        """`Shard.Resume`: the rest of a request handed over to this replica."""
        return self._stub.Resume(shard_pb2.ResumeRequest(request_id=request_id), timeout=timeout_s)

    async def move_kv(
        self, request: shard_pb2.MoveKvRequest, timeout_s: float | None
    ) -> shard_pb2.MoveKvResponse:
        """`Shard.MoveKv`: this replica pushes a request's KV into request.target."""
        return await self._stub.MoveKv(request, timeout=timeout_s)

    async def abort(self, request_id: str, timeout_s: float = 1.0) -> bool:
        request = shard_pb2.AbortRequest(request_id=request_id)
        msg = await self._stub.Abort(request, timeout=timeout_s)
        return msg.found

    async def close(self) -> None:
        await self._channel.close()


class FailoverCall:
    """One request's `Shard.Generate` stream, moved to another healthy replica when
    its replica fails with UNAVAILABLE before any token arrived (nothing has reached
    the client yet, so the retry is invisible). Each replica is tried at most once,
    within the request's original deadline. Once tokens have streamed, an error
    ends the request: its KV cache died with the replica."""

    def __init__(
        self,
        replica: ReplicaClient,
        request: shard_pb2.ShardGenerateRequest,
        timeout_s: float | None,
    ) -> None:
        self.replica = replica
        self._request = request
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._call = replica.start_generate(request, timeout_s)
        self._is_cancelled = False
        self.num_retries = 0

    def __aiter__(self) -> AsyncIterator[shard_pb2.ShardGenerateChunk]:
        return self._stream()

    def cancel(self) -> bool:
        self._is_cancelled = True
        return self._call.cancel()

    async def _stream(self) -> AsyncIterator[shard_pb2.ShardGenerateChunk]:
        tried = {self.replica.address}
        while True:
            has_tokens = False
            try:
                async for msg in self._call:
                    has_tokens = has_tokens or bool(msg.token_ids)
                    yield msg
                return
            except grpc.aio.AioRpcError as err:
                retryable = err.code() is grpc.StatusCode.UNAVAILABLE
                if has_tokens or self._is_cancelled or not retryable:
                    raise
                self.replica.mark_unhealthy(err.details() or "unavailable")
                remaining = None if self._deadline is None else self._deadline - time.monotonic()
                find = self.replica.find_alternative
                target = find(tried) if find is not None else None
                if target is None or (remaining is not None and remaining <= 0):
                    raise
                logger.warning(
                    "[%s] replica %s failed before the first token (%s); retrying on %s",
                    self._request.request_id,
                    self.replica.address,
                    err.details(),
                    target.address,
                )
                tried.add(target.address)
                self.replica = target
                self.num_retries += 1
                if target.address == self._request.handoff_target:
                    # The failed prefill replica may have begun pushing the request's KV
                    # there: end that import first, or the id is taken.
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await target.abort(self._request.request_id)
                self._call = target.start_generate(self._replanned(target), remaining)

    def _replanned(self, target: ReplicaClient) -> shard_pb2.ShardGenerateRequest:
        """The request for `target`: a KV move planned for the failed replica that
        names the target itself (a hand-over to it, its own prefix) is dropped."""
        if target.address not in (self._request.handoff_target, self._request.prefix_source):
            return self._request
        request = shard_pb2.ShardGenerateRequest()
        request.CopyFrom(self._request)
        if request.handoff_target == target.address:
            request.handoff_target = ""
        if request.prefix_source == target.address:
            request.prefix_source = ""
        self._request = request
        return request


class Lease:
    """One request's share of a replica's outstanding tokens, shrinking as tokens arrive."""

    def __init__(self, replica: ReplicaClient, num_tokens: int) -> None:
        self.replica = replica
        self.remaining = num_tokens

    def move_to(self, replica: ReplicaClient) -> None:
        """The request now runs on `replica` (it was handed over)."""
        self.replica.outstanding_tokens -= self.remaining
        self.replica.num_active -= 1
        self.replica = replica
        replica.outstanding_tokens += self.remaining
        replica.num_active += 1

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
        open_channel: ChannelFactory | None = None,
        prefix_affinity: PrefixAffinityConfig | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("at least one replica address is needed")
        open_channel = open_channel or replica_channels()
        self.replicas = tuple(ReplicaClient(a, open_channel) for a in addresses)
        for replica in self.replicas:
            replica.find_alternative = self._alternative
        self._poll_interval_s = poll_interval_s
        self._status_timeout_s = status_timeout_s
        self._on_health_change = on_health_change
        self._was_serving = False
        self._poll_task: asyncio.Task[None] | None = None
        # session_id -> address of the replica that served the session's last turn.
        self._affinity: OrderedDict[str, str] = OrderedDict()
        # Prompt prefixes each replica probably holds (requests without a session).
        affinity = prefix_affinity or PrefixAffinityConfig()
        self._load_slack = affinity.load_slack
        self.prefixes: PrefixIndex | None = None
        # Requests routed so far, by why their replica was chosen: session (the
        # session's replica), prefix (its prompt's cached prefix) or load.
        self.decisions: dict[str, int] = {"session": 0, "prefix": 0, "load": 0}
        if affinity.enabled:
            self.prefixes = PrefixIndex(affinity.block_tokens, affinity.max_blocks)
        # Requests in flight by id, for live migration (serve.gateway.migration), and
        # the KV codec of the moves this gateway orchestrates.
        self.flights: dict[str, Flight] = {}
        self.kv_codec = "lossless"

    @property
    def is_serving(self) -> bool:
        return any(r.is_healthy for r in self.replicas)

    def healthy_replicas(self) -> list[ReplicaClient]:
        """Replicas in rotation: healthy, reporting a status, not cordoned."""
        return [
            r for r in self.replicas if r.is_healthy and r.status is not None and not r.is_cordoned
        ]

    def replica(self, address: str) -> ReplicaClient | None:
        return next((r for r in self.replicas if r.address == address), None)

    def decode_target(self, exclude: Collection[str]) -> ReplicaClient | None:
        """Where a prefill replica hands its requests over: the least loaded healthy
        replica of role decode (None when there is none)."""
        decoders = [
            r
            for r in self.healthy_replicas()
            if r.status is not None and r.status.role == "decode" and r.address not in exclude
        ]
        return min(decoders, key=_load) if decoders else None

    def migration_target(self, exclude: Collection[str]) -> ReplicaClient | None:
        """Where a request in flight moves: the least loaded healthy replica that
        decodes (role decode or both) outside `exclude`."""
        candidates = [
            r
            for r in self.healthy_replicas()
            if r.address not in exclude and r.status is not None and r.status.role != "prefill"
        ]
        return min(candidates, key=_load) if candidates else None

    def bound_replica(self, session_id: str) -> str:
        """The address that served the session's last turn ('' when none)."""
        return self._affinity.get(session_id, "") if session_id else ""

    async def refresh(self) -> None:
        was_healthy = [r.is_healthy for r in self.replicas]
        await asyncio.gather(*(r.refresh(self._status_timeout_s) for r in self.replicas))
        for replica, before in zip(self.replicas, was_healthy, strict=True):
            if replica.is_healthy and not before and self.prefixes is not None:
                self.prefixes.forget(replica.address)  # it may have restarted, cache empty
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

    def choose(self, session_id: str = "", prompt_ids: Sequence[int] = ()) -> ReplicaClient:
        """The replica that served the session's last turn while it is healthy (it
        holds the dialogue's KV prefix); without a session, the one that probably
        holds more of the prompt's prefix than the least loaded one while its load
        stays within the bound; else the healthy replica with the fewest
        outstanding tokens."""
        healthy = self.healthy_replicas()
        if not healthy:
            raise Unavailable("no healthy replica")
        # New prompts go to prefill replicas (and those doing both) while there are any.
        prompts = [r for r in healthy if r.status is not None and r.status.role != "decode"]
        healthy = prompts or healthy
        bound = self._affinity.get(session_id) if session_id else None
        if bound is not None:
            for replica in healthy:
                if replica.address == bound:
                    self.decisions["session"] += 1
                    return replica
            logger.info("session's replica %s is not in rotation; moving the session", bound)
        chosen = self._by_prefix(healthy, prompt_ids) if bound is None else None
        self.decisions["prefix" if chosen is not None else "load"] += 1
        return chosen or min(healthy, key=_load)

    def _by_prefix(
        self, healthy: Sequence[ReplicaClient], prompt_ids: Sequence[int]
    ) -> ReplicaClient | None:
        """The replica with the longest cached prefix of the prompt, when that is
        longer than the least loaded replica's and its load, with this request's
        tokens, stays within (1 + load_slack) of the mean (bounded-load affinity:
        a prefix every prompt shares cannot pin all traffic on one replica)."""
        if self.prefixes is None or not prompt_ids:
            return None
        cached = self.prefixes.cached_tokens(prompt_ids)
        if not cached:
            return None
        least = cached.get(min(healthy, key=_load).address, 0)
        total = sum(r.outstanding_tokens for r in healthy) + len(prompt_ids)
        bound = (1 + self._load_slack) * total / len(healthy)
        holders = [r for r in healthy if cached.get(r.address, 0) > least]
        holders.sort(key=lambda r: (-cached[r.address], r.outstanding_tokens))
        for replica in holders:
            # As in consistent hashing with bounded loads, a replica takes one more
            # request while its load is within the bound.
            if replica.outstanding_tokens <= bound:
                return replica
            logger.debug(
                "replica %s holds %d prompt tokens but is too loaded (%d outstanding)",
                replica.address,
                cached[replica.address],
                replica.outstanding_tokens,
            )
        return None

    def prefix_source(self, prompt_ids: Sequence[int], replica: ReplicaClient) -> str:
        """A healthy replica that probably holds more of the prompt's prefix than
        `replica` (to fetch it from), or ''."""
        if self.prefixes is None or not prompt_ids:
            return ""
        cached = self.prefixes.cached_tokens(prompt_ids)
        here = cached.get(replica.address, 0)
        holders = [
            r
            for r in self.replicas
            if r is not replica and r.is_healthy and cached.get(r.address, 0) > here
        ]
        if not holders:
            return ""
        return max(holders, key=lambda r: cached[r.address]).address

    def remember(self, address: str, token_ids: Sequence[int]) -> None:
        """`address` holds the KV of `token_ids` now (a finished prompt and answer)."""
        if self.prefixes is not None and address:
            self.prefixes.record(address, token_ids)

    def bind(self, session_id: str, address: str) -> None:
        """Routes the session's next turns to `address` (the least recently bound
        sessions are forgotten past MAX_AFFINITY_SESSIONS)."""
        if not session_id or not address:
            return
        self._affinity[session_id] = address
        self._affinity.move_to_end(session_id)
        while len(self._affinity) > MAX_AFFINITY_SESSIONS:
            self._affinity.popitem(last=False)

    def unbind(self, session_id: str) -> None:
        self._affinity.pop(session_id, None)

    def _alternative(self, exclude: Collection[str]) -> ReplicaClient | None:
        """The least loaded healthy replica whose address is not in `exclude`, one
        that takes prompts (not a decode-only replica) when there is one."""
        healthy = [r for r in self.healthy_replicas() if r.address not in exclude]
        if not healthy:
            return None
        return min(healthy, key=lambda r: (_is_decode_only(r), _load(r)))

    @contextlib.contextmanager
    def track_flight(self, flight: Flight) -> Iterator[Flight]:
        """Lists a request as in flight (movable) while it runs."""
        self.flights[flight.request_id] = flight
        try:
            yield flight
        finally:
            self.flights.pop(flight.request_id, None)

    @contextlib.contextmanager
    def track(self, replica: ReplicaClient, num_tokens: int) -> Iterator[Lease]:
        """Counts a request's tokens against the replica while it runs."""
        lease = Lease(replica, num_tokens)
        replica.outstanding_tokens += num_tokens
        replica.num_active += 1
        try:
            yield lease
        finally:
            lease.replica.outstanding_tokens -= lease.remaining
            lease.replica.num_active -= 1

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


def _load(replica: ReplicaClient) -> tuple[int, int]:
    return replica.outstanding_tokens, replica.num_active


def _is_decode_only(replica: ReplicaClient) -> bool:
    return replica.status is not None and replica.status.role == "decode"
