"""KV moves between this replica's paged cache and frame streams (DESIGN.md §3).

One mechanism serves three uses:

- live migration: `move` pushes a running request's KV into another replica's
  ImportKv, first as a pre-copy while decoding goes on, then (final) it pauses
  the request, sends the tokens computed meanwhile plus the request's state, and
  the target stages it until the gateway calls Resume there;
- disaggregated prefill: `generate_with_handoff` taps each layer's KV as the
  prefill computes it and streams it to the decode replica, which takes the
  request over after its first token;
- prefix reuse: `maybe_fetch_prefix` pulls a cached dialogue prefix from the
  replica that holds it when the link model predicts that beats recomputing.

A stream is a KvHeader (geometry, codec, the tokens it covers, the request's
state), then KvChunks of one layer and whole key groups each (a key
frame and a value frame, serve.comm.kv_codecs), in any order; a later header
may extend the range and commits the request. Every chunk is encoded on a
worker thread while earlier ones are on the wire, and decoded on another
worker thread on arrival (serve.comm.streaming), so a move takes about its
slowest stage. The engine is only touched on its own thread (AsyncEngine.call);
KV is read from blocks held for the move and written into blocks of a staged
request that nothing schedules yet.

KV moves carry every KV head: a TP leader, which holds only its share, gathers
the other ranks' heads (and scatters those it receives) through its step-plan
channel (serve.engine.runner). Block sizes, cache dtypes and TP sizes may
differ between the ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from serve.comm.kv_codecs import (
    KEY_GROUP,
    KvCodec,
    KvGeometry,
    decode_kv,
    encode_kv_pieces,
    measure_kv_codec,
)
from serve.comm.linkmodel import LinkModel
from serve.comm.streaming import PipelinedSink, StageClock, pipelined_map
from serve.engine.engine import (
    AsyncEngine,
    Handoff,
    KvSnapshot,
    LLMEngine,
    Suspension,
    undo_suspend,
)
from serve.engine.request import RequestOutput, RequestState, SamplingParams
from serve.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    ShardwireError,
    Unavailable,
)
from serve.shard.kv_chunks import WireChunk, serialize_chunk, wire_chunk

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_KV_CODEC = "lossless"
IMPORT_KV = "/shardwire.v1.Shard/ImportKv"
# A chunk holds one layer's KV of whole key groups, about CHUNK_BYTES per frame: large
# enough that per-chunk overheads vanish, small enough to keep the stages overlapping
# (`shardwire bench kv`, 4080 tokens, lossy codecs: 1 MiB chunks moved 15-30% faster
# than 256 KiB ones; a message of two frames stays well under gRPC's 4 MiB cap).
CHUNK_BYTES = 1024 * 1024
MAX_CHUNK_TOKENS = 1024
# Largest gRPC message a replica takes from another (and from a peer's ExportKv): a
# chunk of at least one key group of a wide fp32 KV row (64 tokens x 128 heads x 128
# dims x 4 bytes = 4 MiB a frame, two frames) still fits; gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# A staged request not resumed (or a pre-copy not finished) within this is dropped.
STAGED_TTL_S = 60.0
# A request paused for a hand-over that does not come within this goes on here.
PAUSE_CLAIM_S = 30.0
# Link probes: a tiny one for latency, a larger one for bandwidth; kept this long.
PROBE_SMALL_BYTES = 1
PROBE_LARGE_BYTES = 256 * 1024
PROBE_CHUNK_BYTES = 256 * 1024
LINK_TTL_S = 300.0
# A peer that does not answer a probe (or offer its prefix) within this is skipped.
PEER_TIMEOUT_S = 5.0
# The whole fetch of a prefix; past it the request recomputes.
FETCH_TIMEOUT_S = 120.0
# A prefix is fetched only when predicted at least this much faster than recomputing.
FETCH_MARGIN = 0.8
# Before the engine has timed a prefill: seconds per token ~ 2 * params / this rate.
FALLBACK_FLOPS = 2e10
MAX_ID_CHARS = 256
# When a replica fetches a dialogue prefix another one holds: when the link model
# predicts it faster than recomputing (auto), always, or never.
PREFIX_FETCH = ("auto", "always", "never")

ChannelFactory = Callable[[str], object]


@dataclass
class MoveStats:
    """What one KV stream cost, for responses, logs and benchmarks."""

    num_tokens: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    encode: StageClock = field(default_factory=StageClock)
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)  # all threads


# -- conversions ---------------------------------------------------------------------------


def geometry_of(engine: LLMEngine) -> shard_pb2.KvGeometry:
    cfg = engine.model.config
    dtype = str(engine.runner.kv_caches[0].dtype).removeprefix("torch.")
    return shard_pb2.KvGeometry(
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=dtype,
    )


def state_to_proto(state: RequestState) -> shard_pb2.RequestState:
    sp = state.sampling
    sampling = inference_pb2.SamplingParams(
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        ignore_eos=sp.ignore_eos,
    )
    if sp.seed is not None:
        sampling.seed = sp.seed
    return shard_pb2.RequestState(
        request_id=state.request_id,
        prompt_token_ids=state.prompt_token_ids,
        output_token_ids=state.output_token_ids,
        sampling=sampling,
        stop_token_ids=sp.stop_token_ids,
        seed=state.seed,
        num_cached_prompt_tokens=state.num_cached_tokens,
        queue_s=state.queue_s,
    )


def state_from_proto(msg: shard_pb2.RequestState, num_computed_tokens: int) -> RequestState:
    sp = msg.sampling
    if not sp.max_tokens or not 0.0 < (sp.top_p or 1.0) <= 1.0 or not sp.temperature >= 0:
        raise InvalidArgument("state.sampling is out of range")
    sampling = SamplingParams(
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        top_k=sp.top_k,
        seed=sp.seed if sp.HasField("seed") else None,
        ignore_eos=sp.ignore_eos,
        stop_token_ids=tuple(msg.stop_token_ids),
    )
    return RequestState(
        request_id=msg.request_id,
        prompt_token_ids=tuple(msg.prompt_token_ids),
        output_token_ids=tuple(msg.output_token_ids),
        sampling=sampling,
        seed=msg.seed,
        num_computed_tokens=num_computed_tokens,
        num_cached_tokens=msg.num_cached_prompt_tokens,
        queue_s=max(0.0, msg.queue_s),
    )


def prefix_state(import_id: str, token_ids: Iterable[int]) -> RequestState:
    """A stand-in request holding a prefix while it is imported."""
    return RequestState(import_id, tuple(token_ids), (), SamplingParams(max_tokens=1), 0, 0)


def chunk_tokens(row_bytes: int) -> int:
    """Tokens per chunk: a multiple of KEY_GROUP near CHUNK_BYTES per frame."""
    n = CHUNK_BYTES // max(row_bytes, 1) // KEY_GROUP * KEY_GROUP
    return min(max(n, KEY_GROUP), MAX_CHUNK_TOKENS)


def chunk_ranges(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut into chunks of at most step tokens, each at most one key
    group or whole key groups."""
    s = start
    while s < stop:
        n = min(step, stop - s)
        if n > KEY_GROUP:
            n -= n % KEY_GROUP
        yield s, s + n
        s += n


class KvTransfer:
    """This replica's end of KV moves. `open_channel` makes a gRPC channel to
    another replica (TLS and the cluster secret as configured)."""

    def __init__(
        self, engine: AsyncEngine, open_channel: ChannelFactory, prefix_fetch: str = "auto"
    ) -> None:
        if prefix_fetch not in PREFIX_FETCH:
            raise InvalidArgument(f"prefix_fetch must be one of {PREFIX_FETCH}")
        self.engine = engine
        self.prefix_fetch = prefix_fetch
        self._open_channel = open_channel
        self._channels: dict[str, object] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        # Imports in flight: their handler tasks (an abort cancels the import, whose
        # clean-up frees its staged blocks once no decode writes into them).
        self._importing: dict[str, asyncio.Task] = {}
        self._aborted: set[str] = set()  # imports an abort cancelled
        # Per staged import: tokens of each layer sent from token 0 on, over all of its
        # streams (pre-copy rounds, then the final one). A stream that ends short of
        # its end_token in any layer is refused: its KV would be partly garbage.
        self._arrived: dict[str, list[int]] = {}
        # Clean-ups still running for handlers that were cancelled meanwhile.
        self._cleanups: set[asyncio.Future] = set()
        self._links: dict[str, tuple[float, LinkModel]] = {}
        # Pauses armed by a pre-copy (at an output token), claimed by the final move.
        self._pauses: dict[str, asyncio.Task[Suspension | None]] = {}
        # Requests handed over here and already decoding: their outputs wait for Resume.
        self._started: dict[str, asyncio.Queue] = {}
        # Per KV codec: seconds per element to encode and decode, wire bytes per raw byte.
        self._codec_costs: dict[str, tuple[float, float, float]] = {}

    @property
    def geometry(self) -> shard_pb2.KvGeometry:
        return geometry_of(self.engine.engine)

    def _chunk_tokens(self) -> int:
        cache = self.engine.engine.runner.kv_caches[0]  # [2, blocks, block, heads, dim]
        g = self.geometry
        return chunk_tokens(g.num_kv_heads * g.head_dim * cache.element_size())

    def _check_ids(self, request_id: str, token_ids: Sequence[int]) -> None:
        if len(request_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"request_id is longer than {MAX_ID_CHARS} characters")
        if len(token_ids) >= self.engine.engine.max_model_len:
            raise InvalidArgument(f"a prefix of {len(token_ids)} tokens exceeds the context")

    def _channel(self, address: str) -> object:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._open_channel(address)
        return channel

    def _stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        return shard_pb2_grpc.ShardStub(self._channel(address))

    def _import_kv(self, address: str) -> Callable:
        """The target's ImportKv, taking KvChunks and WireChunks (kv_chunks)."""
        return self._channel(address).stream_unary(  # type: ignore[attr-defined]
            IMPORT_KV,
            request_serializer=serialize_chunk,
            response_deserializer=shard_pb2.ImportKvResponse.FromString,
        )

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        for channel in self._channels.values():
            await channel.close()  # type: ignore[attr-defined]
        self._channels.clear()

    # -- sending ---------------------------------------------------------------------------

    def _read_kv(
        self, layer: int, table: list[int], start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every KV head, [n, kv_heads, head_dim] each, from a worker
        thread. A TP=1 replica reads its cache directly (safe beside steps: held
        blocks do not change); a TP leader gathers the other ranks' heads on the
        engine thread, between steps."""
        runner = self.engine.engine.runner
        if runner.channel is None:
            return runner.read_kv(layer, table, start, stop)
        return self.engine.call_sync(lambda e: e.runner.read_kv_all(layer, table, start, stop))

    def _write_kv(
        self, layer: int, table: list[int], start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Stores every KV head of staged tokens from a worker thread (see _read_kv)."""
        runner = self.engine.engine.runner
        if runner.channel is None:
            runner.write_kv(layer, table, start, k, v)
            return
        self.engine.call_sync(lambda e: e.runner.write_kv_all(layer, table, start, k, v))

    def _encode(self, table: tuple[int, ...], codec: KvCodec, stats: MoveStats) -> Callable:
        def encode(item: tuple[int, int, int]) -> WireChunk:
            layer, start, stop = item
            k, v = self._read_kv(layer, list(table), start, stop)  # [n, kv_heads, head_dim]
            return _chunk(layer, start, k, v, codec, stats)

        return encode

    async def _chunks(
        self,
        snapshot: KvSnapshot,
        start: int,
        codec: KvCodec,
        stats: MoveStats,
        sequential: bool = False,
        messages: bool = False,
    ) -> AsyncIterator[WireChunk | shard_pb2.KvChunk]:
        """Chunks of tokens [start, snapshot.num_tokens), layer by layer; with
        `messages`, as KvChunks (parsed on the worker, not on the event loop)."""
        num_layers = self.geometry.num_layers
        step = self._chunk_tokens()
        items = [
            (layer, s, e)
            for layer in range(num_layers)
            for s, e in chunk_ranges(start, snapshot.num_tokens, step)
        ]
        wire = stats.encode.timed(self._encode(snapshot.block_table, codec, stats))

        def as_message(item: tuple[int, int, int]) -> shard_pb2.KvChunk:
            return wire(item).message()

        encode: Callable = as_message if messages else wire
        if sequential:
            for chunk in await asyncio.to_thread(lambda: [encode(i) for i in items]):
                yield chunk
            return
        async for chunk in pipelined_map(items, encode):
            yield chunk

    async def export(self, request: shard_pb2.ExportKvRequest) -> AsyncIterator[shard_pb2.KvChunk]:
        """ExportKv: a header with the tokens on offer, then their chunks."""
        if request.probe_bytes:
            for chunk in _probe_chunks(request.probe_bytes):
                yield chunk
            return
        codec = _codec(request.codec)
        self._check_ids(request.request_id, request.prefix_token_ids)
        if request.request_id:
            snapshot = await self._hold(lambda e: e.snapshot(request.request_id))
        else:
            ids = list(request.prefix_token_ids)
            snapshot = await self._hold(lambda e: e.snapshot_prefix(ids))
        try:
            yield shard_pb2.KvChunk(
                header=shard_pb2.KvHeader(
                    request_id=request.request_id,
                    geometry=self.geometry,
                    codec=codec.label,
                    end_token=snapshot.num_tokens,
                )
            )
            stats = MoveStats()
            start = min(request.start_token, snapshot.num_tokens)
            chunks = self._chunks(snapshot, start, codec, stats, request.sequential, messages=True)
            async for chunk in chunks:
                yield chunk  # type: ignore[misc]
        finally:
            await self.engine.call(lambda e: e.release(snapshot))

    async def move(self, request: shard_pb2.MoveKvRequest) -> shard_pb2.MoveKvResponse:
        """MoveKv: pushes KV (and, when final, the request) into the target's ImportKv."""
        codec = _codec(request.codec)
        rid = request.request_id
        self._check_ids(rid, request.prefix_token_ids)
        if not rid or not request.target:
            raise InvalidArgument("request_id and target must not be empty")
        suspension: Suspension | None = None
        if request.prefix_token_ids:
            ids = list(request.prefix_token_ids)
            snapshot = await self._hold(lambda e: e.snapshot_prefix(ids))
            state = prefix_state(rid, snapshot.token_ids)
        elif request.final:
            pause = self._pauses.pop(rid, None)
            if pause is not None:
                suspension = await pause
            else:
                suspension = await self.engine.suspend(rid, request.at_output_token)
            if suspension is None:
                return shard_pb2.MoveKvResponse(moved=False)
            snapshot, state = suspension.snapshot, suspension.state
        else:
            snapshot, state = await self._hold(
                lambda e: _snapshot_with_state(e, rid), snapshot_of=lambda held: held[0]
            )
            if request.at_output_token:
                self._arm_pause(rid, request.at_output_token)
        stats = MoveStats()
        header = shard_pb2.KvHeader(
            request_id=rid,
            geometry=self.geometry,
            codec=codec.label,
            end_token=snapshot.num_tokens,
            state=state_to_proto(state),
            commit=request.final,
            prefix=bool(request.prefix_token_ids),
            sequential=request.sequential,
        )
        start = min(request.start_token, snapshot.num_tokens)
        encoded: list[WireChunk] | None = None

        async def messages() -> AsyncIterator[shard_pb2.KvChunk | WireChunk]:
            yield shard_pb2.KvChunk(header=header)
            if encoded is not None:
                for chunk in encoded:
                    yield chunk
                return
            async for chunk in self._chunks(snapshot, start, codec, stats):
                yield chunk

        try:
            if request.sequential:  # every chunk encoded before the first is sent
                encoded = [c async for c in self._chunks(snapshot, start, codec, stats, True)]
            response = await self._stream_to(request.target, messages())
        except BaseException as exc:
            # The request goes on here: a pause still waiting is cancelled (which
            # undoes it), one already taken is released and resumed in undo().
            pause = self._pauses.pop(rid, None) if not request.final else None
            if pause is not None and not pause.done():
                pause.cancel()

            reason = _describe(exc)

            async def undo() -> None:
                if pause is not None and pause.done():
                    await self._resume_unclaimed(rid, pause)
                await self.engine.call(lambda e: e.release(snapshot))
                if suspension is not None:
                    await self.engine.resume_suspended(rid)
                    logger.warning("[%s] hand-over to %s failed (%s); resumed here", rid,
                                   request.target, reason)  # fmt: skip

            await self._to_the_end(undo())
            if isinstance(exc, ShardwireError | asyncio.CancelledError):
                raise
            raise Unavailable(f"KV move to {request.target} failed: {_describe(exc)}") from exc
        await self.engine.call(lambda e: e.release(snapshot))
        if suspension is not None:
            await self.engine.end_suspended(rid)
        total = time.perf_counter() - stats.started
        cpu = time.process_time() - stats.cpu_started
        logger.info(
            "[%s] KV %s to %s: tokens %d..%d, %s, %.1f MB -> %.1f MB in %.0f ms%s",
            rid,
            "handed over"
            if request.final
            else "prefix"
            if request.prefix_token_ids
            else "pre-copy",
            request.target,
            start,
            snapshot.num_tokens,
            codec.label,
            stats.raw_bytes / 1e6,
            stats.wire_bytes / 1e6,
            total * 1e3,
            f" at output token {len(state.output_token_ids)}" if request.final else "",
        )
        return shard_pb2.MoveKvResponse(
            num_tokens=snapshot.num_tokens,
            wire_bytes=stats.wire_bytes,
            raw_bytes=stats.raw_bytes,
            total_s=total,
            encode_s=stats.encode.busy_s,
            receive_s=response.receive_s,
            decode_s=response.decode_s,
            num_output_tokens=len(state.output_token_ids),
            moved=True,
            source_cpu_s=cpu,
            target_cpu_s=response.cpu_s,
        )

    def _arm_pause(self, rid: str, at_output_token: int) -> None:
        """Pauses the request at an output token while its pre-copy is still on the
        wire, so the hand-over happens exactly there; the final move claims the
        pause, and if none does within PAUSE_CLAIM_S the request goes on here."""
        old = self._pauses.pop(rid, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.engine.suspend(rid, at_output_token))
        self._pauses[rid] = task

        def unclaimed() -> None:
            if self._pauses.get(rid) is task:
                del self._pauses[rid]
                loop.create_task(self._resume_unclaimed(rid, task))

        task.add_done_callback(lambda _: loop.call_later(PAUSE_CLAIM_S, unclaimed))

    async def _resume_unclaimed(self, rid: str, pause: asyncio.Task) -> None:
        if pause.cancelled() or pause.exception() is not None or pause.result() is None:
            return
        suspension: Suspension = pause.result()
        await self.engine.call(lambda e: e.release(suspension.snapshot))
        await self.engine.resume_suspended(rid)
        logger.warning("[%s] paused for a hand-over that failed or did not come; going on", rid)

    async def _stream_to(
        self, target: str, messages: AsyncIterator[shard_pb2.KvChunk | WireChunk]
    ) -> shard_pb2.ImportKvResponse:
        """Sends messages into the target's ImportKv (WireChunks as the bytes they
        hold); an error raised while making them (which cancels the call) comes out
        as itself."""
        errors: list[BaseException] = []

        async def guarded() -> AsyncIterator[shard_pb2.KvChunk | WireChunk]:
            try:
                async for msg in messages:
                    yield msg
            except BaseException as exc:
                errors.append(exc)
                raise

        call = self._import_kv(target)(guarded())
        try:
            return await call
        except BaseException:
            call.cancel()
            task = asyncio.current_task()
            if errors and not (task is not None and task.cancelling()):
                raise errors[0] from None
            raise

    # -- receiving -------------------------------------------------------------------------

    async def import_(
        self, messages: AsyncIterator[shard_pb2.KvChunk]
    ) -> shard_pb2.ImportKvResponse:
        """ImportKv: stages the request (or prefix) and writes its KV as chunks arrive."""
        started = time.perf_counter()
        cpu_started = time.process_time()
        first = await anext(aiter(messages), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("an ImportKv stream starts with a header")
        header = first.header
        rid = header.request_id
        if not rid:
            raise InvalidArgument("header.request_id must not be empty")
        self._check_ids(rid, header.state.prompt_token_ids)
        if rid in self._importing:
            raise FailedPrecondition(f"KV of {rid!r} is already being imported")
        geometry = self._check_geometry(header.geometry)
        codec = _codec(header.codec)
        self._importing[rid] = asyncio.current_task()  # type: ignore[assignment]
        self._aborted.discard(rid)
        had_expiry = self._cancel_expiry(rid)
        num_layers = header.geometry.num_layers
        arrived = self._arrived.setdefault(rid, [0] * num_layers)
        decode_clock = StageClock()
        received = [0]  # frame bytes, counted as the decoder takes them out of the messages
        sink: PipelinedSink = PipelinedSink(self._decode(geometry, received), clock=decode_clock)
        end_token = 0
        commit = False
        buffered: list[tuple[shard_pb2.KvChunk, list[int]]] = []
        try:
            table: list[int] = []
            received_s = 0.0
            msg: shard_pb2.KvChunk | None = first
            stream = aiter(messages)
            while msg is not None:
                if msg.HasField("header"):
                    h = msg.header
                    if h.request_id != rid or (h.codec and _codec(h.codec).label != codec.label):
                        raise InvalidArgument("a later header changed the request or the codec")
                    end_token = max(end_token, h.end_token)
                    commit = commit or h.commit
                    state = state_from_proto(h.state, end_token) if not h.prefix else None
                    if h.prefix:
                        state = prefix_state(rid, h.state.prompt_token_ids)
                    table = await self.engine.call(
                        lambda e, s=state, n=end_token: e.stage(s, n, codec.is_exact)
                    )
                else:
                    _check_chunk(msg, end_token, num_layers)
                    if msg.start_token <= arrived[msg.layer]:
                        arrived[msg.layer] = max(
                            arrived[msg.layer], msg.start_token + msg.num_tokens
                        )
                    if header.sequential:
                        buffered.append((msg, table))
                    else:
                        await sink.put((msg, table))
                received_s = time.perf_counter() - started
                msg = await anext(stream, None)
            for item in buffered:
                await sink.put(item)
            await sink.close()  # raises a chunk's decode error first
            _check_arrived(arrived, end_token)
            wire_bytes = received[0]
        except BaseException as exc:
            self._arrived.pop(rid, None)

            async def abandon() -> None:
                try:
                    await sink.discard()
                    await self.engine.call(lambda e: e.drop_staged(rid))
                finally:
                    self._importing.pop(rid, None)

            try:
                await self._to_the_end(abandon())
            finally:
                aborted = rid in self._aborted
                self._aborted.discard(rid)
                if had_expiry and rid in self._started:
                    self._expire_later(rid)  # a refused import keeps its wait for Resume
            if aborted and isinstance(exc, asyncio.CancelledError):
                raise Aborted(f"request {rid!r} was aborted while its KV arrived") from None
            raise
        self._importing.pop(rid, None)
        if header.prefix or commit:
            self._arrived.pop(rid, None)
        cached = 0
        if header.prefix:
            cached = await self.engine.call(lambda e: e.cache_staged_prefix(rid))
        elif commit:
            # Decoding starts now, not when Resume comes: the pause of a hand-over
            # does not wait for the gateway's round trip.
            try:
                self._started[rid] = await self.engine.start(rid)
            except BaseException:
                await self._to_the_end(self.engine.call(lambda e: e.drop_staged(rid)))
                raise
            self._expire_later(rid)
        else:
            self._expire_later(rid)
        logger.info(
            "[%s] KV imported: %d tokens, %s, %.1f MB in %.0f ms%s",
            rid,
            end_token,
            codec.label,
            wire_bytes / 1e6,
            (time.perf_counter() - started) * 1e3,
            " (ready to resume)" if commit else " (prefix)" if header.prefix else "",
        )
        return shard_pb2.ImportKvResponse(
            num_tokens=end_token,
            wire_bytes=wire_bytes,
            receive_s=received_s,
            decode_s=decode_clock.busy_s,
            cached_tokens=cached,
            cpu_s=time.process_time() - cpu_started,
        )

    async def _hold(
        self,
        take: Callable[[LLMEngine], T],
        snapshot_of: Callable[[T], KvSnapshot] | None = None,
    ) -> T:
        """engine.call(take) for a call that holds a snapshot's blocks: when this task
        is cancelled before the result reaches it (a deadline, a client gone), the
        snapshot taken meanwhile on the engine thread is released, not leaked."""
        task = asyncio.ensure_future(self.engine.call(take))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def release(done: asyncio.Future) -> None:
                if done.cancelled() or done.exception() is not None:
                    return
                held = done.result()
                snapshot = held if snapshot_of is None else snapshot_of(held)
                cleanup = asyncio.ensure_future(self.engine.call(lambda e: e.release(snapshot)))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)

            task.add_done_callback(release)
            raise

    async def _to_the_end(self, cleanup: Awaitable[object]) -> None:
        """Awaits `cleanup`, which runs to its end even if this task is cancelled
        meanwhile: gRPC cancels a handler whose call it already ended (a message past
        the size cap, a client gone), also while the handler cleans up after an error,
        and staged blocks or a paused request must not be left behind."""
        task = asyncio.ensure_future(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    def _check_geometry(self, theirs: shard_pb2.KvGeometry) -> KvGeometry:
        mine = self.geometry
        if (theirs.num_layers, theirs.num_kv_heads, theirs.head_dim) != (
            mine.num_layers,
            mine.num_kv_heads,
            mine.head_dim,
        ):
            raise FailedPrecondition(
                f"KV of {theirs.num_layers} layers x {theirs.num_kv_heads} heads x "
                f"{theirs.head_dim} does not fit this model ({mine.num_layers} x "
                f"{mine.num_kv_heads} x {mine.head_dim})"
            )
        return KvGeometry.named(theirs.num_kv_heads, theirs.head_dim, theirs.dtype)

    def _decode(self, geometry: KvGeometry, received: list[int]) -> Callable:
        def decode(item: tuple[shard_pb2.KvChunk, list[int]]) -> None:
            msg, table = item
            key, value = msg.key_frame, msg.value_frame  # each read copies its bytes
            received[0] += len(key) + len(value)
            k, v = decode_kv(key, value, msg.num_tokens, geometry)
            self._write_kv(msg.layer, table, msg.start_token, k, v)

        return decode

    def _expire_later(self, rid: str) -> None:
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._expiry.pop(rid, None)
            if self._started.pop(rid, None) is not None:
                self.engine.abort(rid)
                logger.warning("[%s] handed over but not resumed within %.0f s: aborted", rid,
                               STAGED_TTL_S)  # fmt: skip
            elif rid not in self._importing:
                loop.create_task(self._drop_expired(rid))

        self._expiry[rid] = loop.call_later(STAGED_TTL_S, expire)

    async def _drop_expired(self, rid: str) -> None:
        self._arrived.pop(rid, None)
        if await self.engine.call(lambda e: e.drop_staged(rid)):
            logger.warning("[%s] staged KV dropped: not resumed within %.0f s", rid, STAGED_TTL_S)

    def _cancel_expiry(self, rid: str) -> bool:
        handle = self._expiry.pop(rid, None)
        if handle is not None:
            handle.cancel()
        return handle is not None

    async def resume(self, rid: str) -> AsyncIterator[RequestOutput]:
        """Resume: starts a request whose KV was handed over here."""
        if rid in self._importing:
            raise FailedPrecondition(f"KV of {rid!r} is still arriving")
        self._cancel_expiry(rid)
        outputs = self._started.pop(rid, None)
        stream = self.engine.resume(rid) if outputs is None else self.engine.follow(rid, outputs)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield out

    async def drop(self, rid: str) -> bool:
        """Abort of a request that is only staged here (or started, not resumed)."""
        self._cancel_expiry(rid)
        if self._started.pop(rid, None) is not None:
            self.engine.abort(rid)
            return True
        importing = self._importing.get(rid)
        if importing is not None:
            self._aborted.add(rid)
            importing.cancel()  # its clean-up drops the staged blocks after the decodes
            await asyncio.wait({importing})  # so the id is free when this returns
            return True
        self._arrived.pop(rid, None)
        return await self.engine.call(lambda e: e.drop_staged(rid))

    # -- disaggregated prefill -------------------------------------------------------------

    async def generate_with_handoff(
        self,
        rid: str,
        prompt: list[int],
        sampling: SamplingParams,
        target: str,
        codec_name: str,
    ) -> AsyncIterator[RequestOutput]:
        """Generate on a prefill replica: each layer's KV streams to `target` as it is
        computed, and after the first token the request moves there (the last output
        here is MIGRATED). If the target fails, the request simply goes on here."""
        codec = _codec(codec_name)
        loop = asyncio.get_running_loop()
        layers: asyncio.Queue = asyncio.Queue()

        def sink(layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
            loop.call_soon_threadsafe(layers.put_nowait, (layer, start, k, v))

        suspended: concurrent.futures.Future = concurrent.futures.Future()
        stream = self.engine.generate(rid, prompt, sampling, handoff=Handoff(sink, suspended))
        push = asyncio.create_task(
            self._push_handoff(rid, prompt, sampling, target, codec, layers, suspended)
        )
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    yield out
        finally:
            if not push.done():
                push.cancel()
            with contextlib.suppress(BaseException):
                await push

    async def _push_handoff(
        self,
        rid: str,
        prompt: list[int],
        sampling: SamplingParams,
        target: str,
        codec: KvCodec,
        layers: asyncio.Queue,
        suspended: concurrent.futures.Future,
    ) -> None:
        stats = MoveStats()
        done = asyncio.wrap_future(suspended)
        first = RequestState(rid, tuple(prompt), (), sampling, 0, 0)
        header = shard_pb2.KvHeader(
            request_id=rid,
            geometry=self.geometry,
            codec=codec.label,
            end_token=len(prompt),
            state=state_to_proto(first),
        )

        step = self._chunk_tokens()

        async def pieces() -> AsyncIterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
            while True:
                if layers.empty() and done.done():
                    return  # every layer tapped before the suspension is queued already
                getter = asyncio.ensure_future(layers.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                layer, start, k, v = getter.result()
                for s, e in chunk_ranges(0, k.shape[0], step):
                    yield layer, start + s, k[s:e], v[s:e]

        def encode(piece: tuple[int, int, torch.Tensor, torch.Tensor]) -> WireChunk:
            return _chunk(*piece, codec, stats)

        suspension: Suspension | None = None

        async def messages() -> AsyncIterator[shard_pb2.KvChunk | WireChunk]:
            nonlocal suspension
            yield shard_pb2.KvChunk(header=header)
            async for chunk in pipelined_map(pieces(), stats.encode.timed(encode)):
                yield chunk
            suspension = await done
            if suspension is None:
                raise _HandoffVoid()  # finished at its first token: nothing to hand over
            final = shard_pb2.KvHeader(
                request_id=rid,
                end_token=suspension.snapshot.num_tokens,
                state=state_to_proto(suspension.state),
                commit=True,
            )
            yield shard_pb2.KvChunk(header=final)

        try:
            await self._stream_to(target, messages())
        except BaseException as exc:  # noqa: BLE001 - the request goes on here
            # A pause not taken yet (the push failed before the first token) is
            # cancelled; one taken is undone: the request resumes here either way.
            await self.engine.call(lambda e: undo_suspend(e, rid, suspended))
            if not isinstance(exc, _HandoffVoid | asyncio.CancelledError):
                logger.warning("[%s] hand-over to %s failed (%s); decoding here", rid, target,
                               _describe(exc))  # fmt: skip
            return
        assert suspension is not None
        await self.engine.call(lambda e: e.release(suspension.snapshot))
        await self.engine.end_suspended(rid)
        logger.info(
            "[%s] prefill handed over to %s: %d tokens, %s, %.1f MB in %.0f ms",
            rid,
            target,
            suspension.snapshot.num_tokens,
            codec.label,
            stats.wire_bytes / 1e6,
            (time.perf_counter() - stats.started) * 1e3,
        )

    # -- prefix fetch ----------------------------------------------------------------------

    async def maybe_fetch_prefix(
        self, rid: str, prompt: list[int], source: str, codec_name: str
    ) -> int:
        """Pulls the prompt's cached prefix from `source` when the link model predicts
        that is faster than recomputing the tokens this replica lacks; returns the
        tokens fetched (0: not fetched). Failures only cost the attempt."""
        if self.prefix_fetch == "never":
            return 0
        try:
            return await self._fetch_prefix(rid, prompt, source, _codec(codec_name))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recomputing is always possible
            logger.warning("[%s] prefix fetch from %s failed: %s", rid, source, _describe(exc))
            return 0

    async def _fetch_prefix(self, rid: str, prompt: list[int], source: str, codec: KvCodec) -> int:
        engine = self.engine.engine
        bs = engine.kv.block_size
        usable = prompt[: (len(prompt) - 1) // bs * bs]  # one token is always computed
        local = await self.engine.call(lambda e: e.cached_prefix_tokens(usable))
        if len(usable) - local < bs:
            return 0
        request = shard_pb2.ExportKvRequest(prefix_token_ids=usable, codec=codec.label)
        call = self._stub(source).ExportKv(request, timeout=FETCH_TIMEOUT_S)
        try:
            first = await asyncio.wait_for(anext(aiter(call), None), PEER_TIMEOUT_S)
            if first is None or not first.HasField("header"):
                return 0
            remote = first.header.end_token
            gain = remote - local
            if gain < bs:
                return 0
            link = await self._link(source)
            fetch_s = self._predict_fetch_s(link, codec, remote)
            recompute_s = gain * self._prefill_s_per_token()
            decision = self.prefix_fetch == "always" or should_fetch(fetch_s, recompute_s)
            logger.info(
                "[%s] prefix on %s: %d tokens (%d here); fetch %.0f ms vs recompute %.0f ms: %s",
                rid, source, remote, local, fetch_s * 1e3, recompute_s * 1e3,
                "fetching" if decision else "recomputing",
            )  # fmt: skip
            if not decision:
                return 0
            header = shard_pb2.KvHeader(
                request_id=f"prefix-{rid}",
                geometry=first.header.geometry,
                codec=first.header.codec,
                end_token=remote,
                state=shard_pb2.RequestState(prompt_token_ids=usable[:remote]),
                prefix=True,
            )

            async def messages() -> AsyncIterator[shard_pb2.KvChunk]:
                yield shard_pb2.KvChunk(header=header)
                async for chunk in call:
                    yield chunk

            response = await self.import_(messages())
            return response.cached_tokens
        finally:
            call.cancel()  # type: ignore[attr-defined]

    async def _link(self, address: str) -> LinkModel:
        """Latency and bandwidth to a replica: two timed probes, kept LINK_TTL_S."""
        now = time.monotonic()
        known = self._links.get(address)
        if known is not None and now - known[0] < LINK_TTL_S:
            return known[1]
        stub = self._stub(address)

        async def timed(nbytes: int) -> float:
            start = time.perf_counter()
            request = shard_pb2.ExportKvRequest(probe_bytes=nbytes)
            async for _ in stub.ExportKv(request, timeout=PEER_TIMEOUT_S):
                pass
            return time.perf_counter() - start

        await timed(PROBE_SMALL_BYTES)  # connection set up
        alpha = min([await timed(PROBE_SMALL_BYTES) for _ in range(3)])
        big = await timed(PROBE_LARGE_BYTES)
        beta = PROBE_LARGE_BYTES / max(big - alpha, 1e-6)
        link = LinkModel(alpha_s=alpha, beta_bytes_per_s=beta)
        logger.info("link to %s: %.2f ms, %.0f Mbit/s", address, alpha * 1e3, beta * 8 / 1e6)
        self._links[address] = (now, link)
        return link

    def _predict_fetch_s(self, link: LinkModel, codec: KvCodec, num_tokens: int) -> float:
        """Pipelined: the slowest of encode, wire and decode, plus one latency."""
        g = self.geometry
        numel = 2 * g.num_layers * num_tokens * g.num_kv_heads * g.head_dim
        itemsize = 4 if g.dtype == "float32" else 2
        enc_s, dec_s, ratio = self._codec_cost(codec)
        return predict_fetch_s(link, numel, itemsize, ratio, enc_s, dec_s)

    def _codec_cost(self, codec: KvCodec) -> tuple[float, float, float]:
        """Seconds per element to encode and to decode, and wire bytes per raw byte,
        timed once on a KV-like chunk."""
        known = self._codec_costs.get(codec.label)
        if known is None:
            g = self.geometry
            geometry = KvGeometry.named(g.num_kv_heads, g.head_dim, g.dtype)
            known = measure_kv_codec(codec, geometry, self._chunk_tokens())
            self._codec_costs[codec.label] = known
        return known

    def _prefill_s_per_token(self) -> float:
        engine = self.engine.engine
        if engine.prefill_s_per_token > 0:
            return engine.prefill_s_per_token
        params = sum(p.numel() for p in engine.model.parameters())
        return 2 * params / FALLBACK_FLOPS


def predict_fetch_s(
    link: LinkModel,
    numel: float,
    itemsize: int,
    wire_ratio: float,
    encode_s_per_elem: float,
    decode_s_per_elem: float,
) -> float:
    """Seconds to move numel KV elements over `link`, pipelined: one latency plus
    the slowest of encoding, the wire (wire_ratio bytes per raw byte) and decoding."""
    wire_s = link.exchange_s(numel * itemsize * wire_ratio) - link.alpha_s
    return link.alpha_s + max(wire_s, encode_s_per_elem * numel, decode_s_per_elem * numel)


def should_fetch(fetch_s: float, recompute_s: float) -> bool:
    """Fetch a prefix only when clearly faster than recomputing it."""
    return fetch_s < FETCH_MARGIN * recompute_s


class _HandoffVoid(Exception):
    """The request ended before it could be handed over."""


def _snapshot_with_state(engine: LLMEngine, rid: str) -> tuple[KvSnapshot, RequestState]:
    snapshot = engine.snapshot(rid)
    req = engine.scheduler.requests.get(rid) or engine.suspended[rid]
    return snapshot, req.state()


def _chunk(
    layer: int, start: int, k: torch.Tensor, v: torch.Tensor, codec: KvCodec, stats: MoveStats
) -> WireChunk:
    key, value = encode_kv_pieces(k, v, codec)
    chunk = wire_chunk(layer, start, k.shape[0], key, value)
    stats.raw_bytes += 2 * k.numel() * k.element_size()
    stats.wire_bytes += chunk.frame_bytes
    stats.num_tokens = max(stats.num_tokens, start + k.shape[0])
    return chunk


def _check_chunk(msg: shard_pb2.KvChunk, end_token: int, num_layers: int) -> None:
    if msg.layer >= num_layers:
        raise InvalidArgument(f"chunk of layer {msg.layer}; the model has {num_layers}")
    n = msg.num_tokens
    if not 0 < n <= MAX_CHUNK_TOKENS or msg.start_token + n > end_token:
        raise InvalidArgument(
            f"chunk of tokens {msg.start_token}..{msg.start_token + n} outside "
            f"the announced 0..{end_token} (or more than {MAX_CHUNK_TOKENS})"
        )


def _check_arrived(arrived: list[int], end_token: int) -> None:
    """Refuses an import stream that ended before every layer's KV up to end_token
    came (cut off, or a sender that skipped tokens)."""
    short = [(layer, n) for layer, n in enumerate(arrived) if n < end_token]
    if short:
        layer, n = short[0]
        raise InvalidArgument(
            f"the KV stream ended with tokens {n}..{end_token} of layer {layer} missing "
            f"({len(short)} of {len(arrived)} layers short)"
        )


def _probe_chunks(nbytes: int) -> Iterator[shard_pb2.KvChunk]:
    nbytes = min(nbytes, 4 * PROBE_LARGE_BYTES)
    for start in range(0, nbytes, PROBE_CHUNK_BYTES):
        yield shard_pb2.KvChunk(key_frame=bytes(min(PROBE_CHUNK_BYTES, nbytes - start)))


def _kind(request: shard_pb2.MoveKvRequest) -> str:
    if request.final:
        return "handed over"
    return "prefix" if request.prefix_token_ids else "pre-copy"


def _codec(name: str) -> KvCodec:
    return KvCodec.parse(name or DEFAULT_KV_CODEC)


def _describe(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        code = exc.code()  # type: ignore[attr-defined]
        return f"{getattr(code, 'name', code)}: {details()}"
    return f"{type(exc).__name__}: {exc}"
