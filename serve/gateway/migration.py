"""Live migration of requests in flight, orchestrated by the gateway.

The KV itself goes replica to replica (`Shard.MoveKv` makes the source push into
the target's `ImportKv`); the gateway only says what moves where and keeps the
client's stream whole:

1. pre-copy: the source sends the KV written so far while it keeps decoding;
2. hand-over: the source pauses the request (at an output token if asked), sends
   the KV computed since and the request's state (tokens, seed, sampling), the
   target stages it, and the source ends its Generate stream with `migrated`;
3. the request's generation loop (serve.gateway.generation) sees `migrated`,
   opens `Shard.Resume` on the target and goes on, dropping any token index it
   has already delivered, so the client sees one stream, nothing repeated or lost.

If anything fails before the hand-over completes, the request goes on where it
was. `drain` moves every request of a replica (Admin.Drain, or a replica that
reports `draining` on SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
from shardwire.v1 import shard_pb2

from serve.errors import FailedPrecondition, NotFound, Unavailable
from serve.gateway.router import ReplicaClient, Router

logger = logging.getLogger(__name__)

# A pre-copy that takes longer than this is abandoned (the hand-over still happens).
PRECOPY_TIMEOUT_S = 120.0
# Pre-copy rounds: each sends the tokens computed during the previous one, until a
# round moves fewer than PRECOPY_DONE_TOKENS (the pause then only waits for those).
MAX_PRECOPY_ROUNDS = 4
PRECOPY_DONE_TOKENS = 16
# How long a generation loop waits for the outcome of a hand-over it has seen.
HANDOVER_WAIT_S = 120.0


class Flight:
    """A request in flight as the gateway tracks it: where it runs and how many
    of its output tokens the client has."""

    def __init__(self, request_id: str, replica: ReplicaClient) -> None:
        self.request_id = request_id
        self.replica = replica
        self.num_delivered = 0
        # Resolves to the replica a hand-over went to (None: no hand-over).
        self.handover: asyncio.Future[ReplicaClient | None] | None = None
        # The hand-over a prefill replica makes after its first token, while expected.
        self.prefill_handover: asyncio.Future[ReplicaClient | None] | None = None
        self.last_token_at: float | None = None
        # The replica call the request's tokens come from now.
        self.call: object | None = None
        # Last token on the source to first token on the target, per hand-over.
        self.pauses_s: list[float] = []

    def cancel(self) -> None:
        """Cancels the current replica call (the replica aborts the request)."""
        if self.call is not None:
            self.call.cancel()  # type: ignore[attr-defined]

    def forget_handover(self) -> None:
        """The request ends here: a target that took it over but was never switched
        to (the client left meanwhile) drops it now rather than at its timeout, and
        so does one that takes it over later (a move still under way)."""
        handover, self.handover = self.handover, None
        if handover is None:
            return
        replica = self.replica

        def drop(done: asyncio.Future) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            target = done.result()
            if target is not None and target is not replica:
                task = asyncio.get_running_loop().create_task(target.abort(self.request_id))
                task.add_done_callback(_ignore_result)

        if handover.done():
            drop(handover)
        else:
            handover.add_done_callback(drop)

    @property
    def is_moving(self) -> bool:
        """A hand-over is under way (or a prefill replica's hand-over is expected)."""
        return self.handover is not None

    def clear_handover(self, handover: asyncio.Future) -> None:
        """A move that did not happen: the request may move again later."""
        if self.handover is handover:
            self.handover = None
        if self.prefill_handover is handover:
            self.prefill_handover = None

    def saw_output(self, num_output_tokens: int, migrated: bool) -> None:
        """A chunk from the replica the request runs on. A prefill replica hands a
        request over at its first output token; a second token from it without
        `migrated` means the hand-over failed and the request stays: it may move later."""
        expected = self.prefill_handover
        if expected is not None and num_output_tokens > 1 and not migrated:
            logger.info("[%s] prefill hand-over did not happen; decoding stays on %s",
                        self.request_id, self.replica.address)  # fmt: skip
            self.clear_handover(expected)

    def expect_handover(self, target: ReplicaClient | None = None) -> asyncio.Future:
        """A new hand-over: resolved now when the target is known up front."""
        self.handover = asyncio.get_running_loop().create_future()
        if target is not None:
            self.handover.set_result(target)
        return self.handover

    async def handover_target(self) -> ReplicaClient:
        """The target of the hand-over whose `migrated` the source stream just sent."""
        if self.handover is None:
            raise Unavailable("the replica handed the request over unasked")
        try:
            target = await asyncio.wait_for(asyncio.shield(self.handover), HANDOVER_WAIT_S)
        except TimeoutError:
            target = None
        self.handover = self.prefill_handover = None
        if target is None:
            raise Unavailable("the request was handed over, but the move did not complete")
        return target


@dataclass(frozen=True)
class MigrationResult:
    moved: bool
    source: str
    target: str
    num_output_tokens: int = 0
    wire_bytes: int = 0


class Migrator:
    """Moves requests between the router's replicas."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._tasks: set[asyncio.Task] = set()
        for replica in router.replicas:
            replica.on_draining = self._replica_draining

    @property
    def flights(self) -> dict[str, Flight]:
        return self.router.flights

    async def migrate(
        self,
        request_id: str,
        target_address: str = "",
        at_output_token: int = 0,
        kv_codec: str = "",
    ) -> MigrationResult:
        flight = self.flights.get(request_id)
        if flight is None:
            raise NotFound(f"no request {request_id!r} is in flight on this gateway")
        if flight.is_moving:
            raise FailedPrecondition(f"request {request_id!r} is already moving")
        source = flight.replica
        if target_address:
            target = self.router.replica(target_address)
            if target is None or target not in self.router.healthy_replicas():
                raise Unavailable(f"replica {target_address!r} is not in rotation here")
        else:
            target = self.router.migration_target({source.address})
        if target is None:
            raise Unavailable(f"no other replica to move {request_id!r} to")
        if target is source:
            raise FailedPrecondition(f"request {request_id!r} already runs on {source.address}")
        codec = kv_codec or self.router.kv_codec
        handover = flight.expect_handover()
        final_sent = False
        try:
            start = await self._precopy(source, target, request_id, codec, at_output_token)
            final = shard_pb2.MoveKvRequest(
                request_id=request_id,
                target=target.address,
                codec=codec,
                final=True,
                at_output_token=at_output_token,
                start_token=start,
            )
            final_sent = True
            response = await source.move_kv(final, None)
        except grpc.aio.AioRpcError as err:
            # After a failed hand-over the source goes on (or ended the stream: then
            # the target may still hold the request, and Resume is worth a try).
            handover.set_result(target if final_sent else None)
            if not final_sent:
                flight.clear_handover(handover)
            raise Unavailable(f"moving {request_id!r} failed: {err.details()}") from err
        except BaseException:
            if not handover.done():
                handover.set_result(target if final_sent else None)
            if not final_sent:
                flight.clear_handover(handover)
            raise
        handover.set_result(target if response.moved else None)
        if not response.moved:
            flight.clear_handover(handover)
            return MigrationResult(False, source.address, target.address)
        logger.info(
            "[%s] moved %s -> %s at output token %d (%s, %.1f MB)",
            request_id,
            source.address,
            target.address,
            response.num_output_tokens,
            codec,
            response.wire_bytes / 1e6,
        )
        return MigrationResult(
            True, source.address, target.address, response.num_output_tokens, response.wire_bytes
        )

    async def _precopy(
        self,
        source: ReplicaClient,
        target: ReplicaClient,
        request_id: str,
        codec: str,
        at_output_token: int,
    ) -> int:
        """Sends the KV written so far while the request decodes on, in rounds that
        each send what the previous one left behind (the source pauses the request
        at at_output_token meanwhile, when set); returns the tokens the target then
        holds (0 when there was nothing to send yet)."""
        start = 0
        for round_index in range(MAX_PRECOPY_ROUNDS):
            request = shard_pb2.MoveKvRequest(
                request_id=request_id,
                target=target.address,
                codec=codec,
                start_token=start,
                at_output_token=at_output_token if round_index == 0 else 0,
            )
            try:
                response = await source.move_kv(request, PRECOPY_TIMEOUT_S)
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return 0  # not scheduled yet, or slow: the hand-over sends everything
                raise
            moved, start = response.num_tokens - start, response.num_tokens
            if moved < PRECOPY_DONE_TOKENS:
                break
        return start

    async def drain(self, address: str, kv_codec: str = "", cordon: bool = True) -> tuple[int, int]:
        """Moves every request in flight on the replica elsewhere; returns (moved,
        not moved). With `cordon` the replica leaves this gateway's rotation."""
        replica = self.router.replica(address)
        if replica is None:
            raise NotFound(f"no replica {address!r} behind this gateway")
        if cordon:
            replica.is_cordoned = True
        flights = [f for f in self.flights.values() if f.replica is replica and not f.is_moving]
        if not flights:
            return 0, 0
        started = time.monotonic()
        results = await asyncio.gather(
            *(self.migrate(f.request_id, kv_codec=kv_codec) for f in flights),
            return_exceptions=True,
        )
        moved = sum(isinstance(r, MigrationResult) and r.moved for r in results)
        for flight, result in zip(flights, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("[%s] not moved off %s: %s", flight.request_id, address, result)
        logger.info(
            "drained %s: %d of %d requests moved in %.2f s",
            address,
            moved,
            len(flights),
            time.monotonic() - started,
        )
        return moved, len(flights) - moved

    def _replica_draining(self, replica: ReplicaClient) -> None:
        """A replica stopping (SIGTERM) reported `draining`: move its requests now."""
        if self.router.migration_target({replica.address}) is None:
            logger.info("replica %s drains with nowhere to move its requests", replica.address)
            return
        logger.info("replica %s is draining: moving its requests", replica.address)
        task = asyncio.get_running_loop().create_task(self.drain(replica.address, cordon=False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _ignore_result(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("abort on a hand-over target failed: %s", task.exception())
