"""The engine: a synchronous core (add, abort, step) and an asyncio front that
runs the core on its own thread, so gRPC handlers never wait on a forward pass.

A step is three lines: schedule -> run -> update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from serve.config import EngineConfig
from serve.dist.group import PlanChannel
from serve.engine.kv_cache import KVCacheManager
from serve.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    RequestState,
    RequestStatus,
    SamplingParams,
)
from serve.engine.runner import KvSink, ModelRunner, num_kv_blocks
from serve.engine.scheduler import Scheduler
from serve.errors import (
    EngineDead,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShardwireError,
)
from serve.model.llama import LlamaForCausalLM

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    # The last step's batch (0 when the engine is idle) and the steps run so far.
    last_step_num_seqs: int = 0
    last_step_num_tokens: int = 0
    num_steps: int = 0


@dataclass(frozen=True)
class KvSnapshot:
    """Blocks held for a KV move: tokens [0, num_tokens) of a sequence live in
    `block_table` and stay there until the snapshot is released."""

    block_table: tuple[int, ...]
    num_tokens: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Suspension:
    """A request taken out of scheduling for a hand-over: its state and its KV."""

    state: RequestState
    snapshot: KvSnapshot


class LLMEngine:
    def __init__(
        self, model: LlamaForCausalLM, config: EngineConfig, channel: PlanChannel | None = None
    ) -> None:
        self.model = model
        self.config = config
        cfg = model.config
        self.max_model_len = min(
            config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        num_blocks = num_kv_blocks(model, config)
        self.eos_token_ids = frozenset(cfg.eos_token_ids)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, self.max_model_len)
        self.runner = ModelRunner(model, config, num_blocks, channel)
        # Read by stats() from other threads: plain ints, written by the engine thread.
        self.last_step_num_seqs = 0
        self.last_step_num_tokens = 0
        self.num_steps = 0
        # Seconds per prompt token of recent prefill steps (what recomputing costs).
        self.prefill_s_per_token = 0.0
        # KV moves: requests taken out of scheduling while they are handed over, requests
        # whose KV is arriving from another replica, and hand-overs waiting for a token.
        self.suspended: dict[str, Request] = {}
        self.staged: dict[str, Request] = {}
        self._suspend_at: dict[str, tuple[int, concurrent.futures.Future]] = {}
        logger.info(
            "engine ready: %d KV blocks of %d tokens, max_model_len %d",
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    def make_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        seed: int | None = None,
    ) -> Request:
        """A validated Request (reads only immutable engine state). `seed` overrides
        the sampling seed (a request moved from another replica keeps its own)."""
        if not prompt_token_ids:
            raise InvalidArgument("prompt_token_ids must not be empty")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(
                f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {vocab})"
            )
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidArgument(
                f"prompt has {len(prompt_token_ids)} tokens; the context holds {self.max_model_len}"
            )
        need = -(
            -min(len(prompt_token_ids) + sampling.max_tokens, self.max_model_len)
            // self.kv.block_size
        )
        if need > self.kv.num_blocks:
            raise ResourceExhausted(
                f"request needs {need} KV blocks; this replica has {self.kv.num_blocks}"
            )
        if seed is None:
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        return Request(request_id, list(prompt_token_ids), sampling, self.eos_token_ids, seed)

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.scheduler.requests or rid in self.suspended or rid in self.staged:
            # (a staged or suspended request holds KV blocks under this id)
            raise InvalidArgument(f"request_id {rid!r} is already running")
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.runner.remove_tap(request_id)
        pending = self._suspend_at.pop(request_id, None)
        if pending is not None and pending[1].set_running_or_notify_cancel():
            pending[1].set_result(None)
        # A staged request is not dropped here: its import may still be writing into
        # its blocks (KvTransfer.drop ends the import, then frees them).
        req = self.suspended.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
            req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
            return self.scheduler._output(req, (), FinishReason.ABORT)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_step_num_seqs = len(out.decodes) + len(out.prefills)
        self.last_step_num_tokens = out.num_tokens
        if out.is_empty:
            self.runner.idle()
            return []
        self.num_steps += 1
        start = time.perf_counter()
        result = self.runner.execute(out, self.kv.req_blocks)
        num_prefill = sum(n for _, n in out.prefills)
        if num_prefill >= 16 and not out.decodes:
            per_token = (time.perf_counter() - start) / num_prefill
            ema = self.prefill_s_per_token
            self.prefill_s_per_token = per_token if ema == 0 else 0.8 * ema + 0.2 * per_token
        outputs = self.scheduler.update(out, result.sampled)
        if self._suspend_at:
            self._check_suspensions()
        return outputs

    # -- KV moves (engine thread only; see serve.shard.kv_transfer) -------------------

    def _hold(self, request_id: str, num_tokens: int, token_ids: list[int]) -> KvSnapshot:
        blocks = -(-num_tokens // self.kv.block_size)
        table = self.kv.block_table(request_id)[:blocks]
        self.kv.acquire(table)
        return KvSnapshot(tuple(table), num_tokens, tuple(token_ids))

    def snapshot(self, request_id: str) -> KvSnapshot:
        """Holds the blocks of the KV a request has so far (it goes on decoding)."""
        req = self.scheduler.requests.get(request_id) or self.suspended.get(request_id)
        if req is None:
            raise NotFound(f"request {request_id!r} is not running here")
        n = req.num_computed_tokens
        return self._hold(request_id, n, req.tokens(0, n))

    def snapshot_prefix(self, token_ids: list[int]) -> KvSnapshot:
        """Holds the cached blocks of the longest prefix of token_ids (full blocks)."""
        blocks, _ = self.kv.match_prefix(token_ids)
        self.kv.acquire(blocks)
        n = len(blocks) * self.kv.block_size
        return KvSnapshot(tuple(blocks), n, tuple(token_ids[:n]))

    def release(self, snapshot: KvSnapshot) -> None:
        self.kv.release(list(snapshot.block_table))

    def suspend_at(
        self, request_id: str, num_output_tokens: int, done: concurrent.futures.Future
    ) -> None:
        """Takes the request out of scheduling once it has num_output_tokens outputs
        (at once if it has them); `done` gets its Suspension, or None if the request
        finished or is unknown."""
        if request_id in self._suspend_at:
            raise FailedPrecondition(f"request {request_id!r} is already being moved")
        self._suspend_at[request_id] = (num_output_tokens, done)
        self._check_suspensions()

    def cancel_suspend(self, request_id: str) -> None:
        pending = self._suspend_at.pop(request_id, None)
        if pending is not None:
            pending[1].cancel()
            self.runner.remove_tap(request_id)

    def _check_suspensions(self) -> None:
        for request_id, (at, done) in list(self._suspend_at.items()):
            req = self.scheduler.requests.get(request_id)
            if req is not None and req.num_output_tokens < at:
                continue
            del self._suspend_at[request_id]
            self.runner.remove_tap(request_id)
            if not done.set_running_or_notify_cancel():
                continue  # the mover gave up
            if req is None:
                done.set_result(None)
                continue
            self.scheduler.remove(request_id)
            req.status = RequestStatus.WAITING
            self.suspended[request_id] = req
            n = req.num_computed_tokens
            done.set_result(Suspension(req.state(), self._hold(request_id, n, req.tokens(0, n))))

    def resume_suspended(self, request_id: str) -> None:
        """Puts a suspended request back into scheduling here (its hand-over failed)."""
        req = self.suspended.pop(request_id, None)
        if req is not None:
            self.scheduler.add(req)
            logger.info("request %s resumes here", request_id)

    def end_suspended(self, request_id: str) -> RequestOutput | None:
        """Frees a handed-over request; its last output says MIGRATED."""
        req = self.suspended.pop(request_id, None)
        if req is None:
            return None
        self.kv.free(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.MIGRATED
        return self.scheduler._output(req, (), FinishReason.MIGRATED)

    def add_tap(self, request_id: str, sink: KvSink) -> None:
        self.runner.add_tap(request_id, sink)

    def stage(self, state: RequestState, num_tokens: int, exact: bool) -> list[int]:
        """Creates or updates a request whose KV is arriving and reserves blocks for
        its first num_tokens tokens; returns its block table (KV is written there off
        the engine thread: nothing scheduled reads those blocks yet)."""
        rid = state.request_id
        req = self.staged.get(rid)
        if req is None:
            if rid in self.scheduler.requests or rid in self.suspended:
                raise FailedPrecondition(f"request {rid!r} is already running here")
            req = self._request_from_state(state)
            self.staged[rid] = req
        else:
            if tuple(req.prompt_token_ids) != state.prompt_token_ids:
                raise InvalidArgument(f"request {rid!r} changed its prompt between KV moves")
            if state.output_token_ids[: req.num_output_tokens] != tuple(req.output_token_ids):
                raise InvalidArgument(f"request {rid!r}: its output does not extend the last")
            self._check_state(state)
            req.output_token_ids = list(state.output_token_ids)
            req.seed = state.seed
        req.kv_exact = req.kv_exact and exact
        if num_tokens > req.num_tokens:
            raise InvalidArgument(f"KV of {num_tokens} tokens for a request of {req.num_tokens}")
        if num_tokens > req.num_computed_tokens:
            if not self.kv.allocate_slots(req, num_tokens - req.num_computed_tokens):
                self.drop_staged(rid)
                raise ResourceExhausted(f"no KV blocks for {num_tokens} imported tokens")
            req.num_computed_tokens = num_tokens
        return list(self.kv.block_table(rid))

    def _request_from_state(self, state: RequestState) -> Request:
        req = self.make_request(
            state.request_id, list(state.prompt_token_ids), state.sampling, seed=state.seed
        )
        self._check_state(state)
        req.output_token_ids = list(state.output_token_ids)
        req.num_cached_tokens = state.num_cached_tokens
        now = time.monotonic()
        req.arrival_time = now - state.queue_s
        req.first_scheduled_time = now
        return req

    def _check_state(self, state: RequestState) -> None:
        """What a handed-over request's output must satisfy before the engine runs it
        (make_request checks the prompt and the sampling parameters)."""
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in state.output_token_ids):
            raise InvalidArgument("output_token_ids: a token id is outside the vocabulary")
        if state.num_tokens >= self.max_model_len:
            raise InvalidArgument(f"request of {state.num_tokens} tokens exceeds the context")

    def drop_staged(self, request_id: str) -> bool:
        req = self.staged.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
        return req is not None

    def start_staged(self, request_id: str) -> None:
        """Schedules a request whose KV has arrived; it goes on from its last token."""
        req = self.staged.pop(request_id, None)
        if req is None:
            raise NotFound(f"no request {request_id!r} was handed over to this replica")
        # The last token has no KV yet: it is the next step's input.
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
        if req.num_output_tokens >= req.sampling.max_tokens:
            self.kv.free(req)
            raise FailedPrecondition(f"request {request_id!r} has no tokens left to generate")
        self.scheduler.add(req)

    def cache_staged_prefix(self, request_id: str) -> int:
        """Turns a staged import of a prefix into prefix-cache entries (kept until the
        pool needs the blocks); returns the tokens now cached."""
        req = self.staged.pop(request_id, None)
        if req is None:
            raise NotFound(f"no prefix {request_id!r} was imported")
        self.kv.cache_full_blocks(req)
        n = len(self.kv.req_keys.get(request_id, [])) * self.kv.block_size
        self.kv.free(req)
        return n

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Tokens of token_ids (full blocks) this replica's prefix cache holds."""
        return len(self.kv.match_prefix(token_ids)[0]) * self.kv.block_size

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            kv_blocks_free=self.kv.num_free_blocks,
            kv_blocks_total=self.kv.num_blocks,
            prefix_cache_query_tokens=self.kv.num_query_tokens,
            prefix_cache_hit_tokens=self.kv.num_hit_tokens,
            num_preemptions=s.num_preemptions,
            last_step_num_seqs=self.last_step_num_seqs,
            last_step_num_tokens=self.last_step_num_tokens,
            num_steps=self.num_steps,
        )


@dataclass(frozen=True)
class Handoff:
    """Disaggregated prefill: `sink` gets each layer's KV as a step computes it (on
    the engine thread), and once the first token is sampled the request is
    suspended; `suspended` then holds its Suspension (None if it finished)."""

    sink: KvSink
    suspended: concurrent.futures.Future


def undo_suspend(engine: LLMEngine, request_id: str, done: concurrent.futures.Future) -> None:
    """A mover gave up: cancel its pending suspension, or resume the request here."""
    engine.cancel_suspend(request_id)
    if done.done() and not done.cancelled() and done.exception() is None:
        suspension = done.result()
        if suspension is not None:
            engine.release(suspension.snapshot)
            engine.resume_suspended(request_id)


class AsyncEngine:
    """Runs an LLMEngine on a dedicated thread; requests stream via asyncio queues."""

    def __init__(
        self, engine: LLMEngine | None = None, *, build: Callable[[], LLMEngine] | None = None
    ) -> None:
        """Runs `engine`, or the engine `build` makes on the engine thread itself
        (see launch)."""
        if (engine is None) == (build is None):
            raise ValueError("give an engine or a build function, not both")
        self.engine: LLMEngine = engine  # type: ignore[assignment]  # set by build if None
        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams only
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(build,), name="engine", daemon=True)
        self._thread.start()

    @classmethod
    async def launch(cls, build: Callable[[], LLMEngine]) -> AsyncEngine:
        """Builds the engine (model loading included) on the thread that will run
        it. torch's OpenMP workers belong to the thread that first runs a parallel
        region: a second thread doing the forward passes brings a second team, and
        on a small machine the two teams oversubscribe the cores and throttle each
        other's spinning (measured: decode steps ~1.5x slower). One thread does
        all the torch work, so there is one team."""
        engine = cls(build=build)
        await asyncio.to_thread(engine._ready.wait)
        if engine.error is not None:
            raise engine.error
        return engine

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        handoff: Handoff | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; the last one has a finish reason.
        Leaving the iteration early (cancel, close) aborts the request. With a
        `handoff`, each layer's KV goes to its sink as it is computed and the
        request is suspended after its first token (see Handoff)."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        request = self.engine.make_request(request_id, prompt_token_ids, sampling)
        outputs = self._open_stream(request_id)
        self._commands.put(("add", (request, handoff)))
        async for item in self._follow(request_id, outputs):
            yield item

    async def resume(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Schedules a request whose KV was handed over to this replica and streams
        its further outputs, like generate."""
        outputs = await self.start(request_id)
        async for item in self.follow(request_id, outputs):
            yield item

    async def start(self, request_id: str) -> asyncio.Queue:
        """Schedules a request whose KV was handed over to this replica at once; its
        outputs wait in the returned queue until `follow` streams them."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        outputs = self._open_stream(request_id)
        try:
            await self.call(lambda engine: engine.start_staged(request_id))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return outputs

    def follow(self, request_id: str, outputs: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Streams the outputs of a request started with `start`, like generate
        (leaving early aborts it)."""
        return self._follow(request_id, outputs)

    def _submit(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future:
        """Queues fn(engine) for the engine thread, between steps."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", (fn, done)))
        return done

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Runs fn(engine) on the engine thread between steps and returns its result
        (the engine is never touched from another thread)."""
        return await asyncio.wrap_future(self._submit(fn))

    def call_sync(self, fn: Callable[[LLMEngine], T]) -> T:
        """call() for a plain thread (not the event loop's): blocks until fn(engine) has
        run on the engine thread; on the engine thread itself it runs at once."""
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        return self._submit(fn).result()

    async def suspend(self, request_id: str, at_output_tokens: int = 0) -> Suspension | None:
        """Takes a request out of scheduling once it has at_output_tokens outputs (at
        once when it has them already), holding its KV; None when it finished first.
        Follow with end_suspended (handed over) or resume_suspended (not)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        await self.call(lambda engine: engine.suspend_at(request_id, at_output_tokens, done))
        try:
            return await asyncio.shield(asyncio.wrap_future(done))
        except asyncio.CancelledError:
            with contextlib.suppress(EngineDead):  # a dead engine has nothing to undo
                self._submit(lambda engine: undo_suspend(engine, request_id, done))
            raise

    async def end_suspended(self, request_id: str) -> None:
        """Ends a handed-over request here: its stream gets a MIGRATED output."""

        def end(engine: LLMEngine) -> None:
            out = engine.end_suspended(request_id)
            if out is not None:
                self._deliver(request_id, out, True)
                logger.info("request %s handed over", request_id)

        await self.call(end)

    async def resume_suspended(self, request_id: str) -> None:
        await self.call(lambda engine: engine.resume_suspended(request_id))

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise InvalidArgument(f"request_id {request_id!r} is already running")
            self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        return outputs

    async def _follow(
        self, request_id: str, outputs: asyncio.Queue
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)
        if self.error is None and not self._thread.is_alive():
            self.engine.runner.close()

    def _run(self, build: Callable[[], LLMEngine] | None) -> None:
        if build is not None:
            try:
                self.engine = build()
            except BaseException as exc:  # noqa: BLE001 - launch() re-raises it
                self.error = exc
                self._ready.set()
                return
        self._ready.set()
        self._loop()

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                block = not self.engine.has_unfinished()
                self._drain_commands(block)
                outputs = self.engine.step()
                for out in outputs:
                    self._deliver(out.request_id, out, out.finished)
        except BaseException as exc:  # noqa: BLE001 - the engine is dead; tell every stream
            logger.exception("engine loop died")
            self.error = exc
            dead = EngineDead(f"engine failed: {exc}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead, True)

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                request, handoff = arg  # type: ignore[misc]
                try:
                    self.engine.add_request(request)
                except ShardwireError as exc:  # e.g. an id a staged import holds
                    self._deliver(request.request_id, exc, True)
                    continue
                if handoff is not None:
                    self.engine.add_tap(request.request_id, handoff.sink)
                    self.engine.suspend_at(request.request_id, 1, handoff.suspended)
            elif kind == "call":
                fn, done = arg  # type: ignore[misc]
                if done.set_running_or_notify_cancel():
                    try:
                        done.set_result(fn(self.engine))
                    except Exception as exc:  # noqa: BLE001 - the caller gets it
                        done.set_exception(exc)
            elif kind == "abort":
                out = self.engine.abort_request(str(arg))
                if out is not None:
                    self._deliver(out.request_id, out, True)
                    logger.info("request %s aborted", out.request_id)
            elif kind == "stop":
                return

    def _deliver(self, request_id: str, item: object, last: bool) -> None:
        with self._lock:
            entry = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if entry is not None:
            loop, outputs = entry
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's event loop is gone
                logger.warning("request %s: dropped output, event loop closed", request_id)
