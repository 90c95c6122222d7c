"""The engine: a synchronous core (add, abort, step) and an asyncio front that
runs the core on its own thread, so gRPC handlers never wait on a forward pass.

A step is three lines: schedule -> run -> update.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from serve.config import EngineConfig
from serve.dist.group import PlanChannel
from serve.engine.kv_cache import KVCacheManager
from serve.engine.request import Request, RequestOutput, SamplingParams
from serve.engine.runner import ModelRunner, num_kv_blocks
from serve.engine.scheduler import Scheduler
from serve.errors import EngineDead, InvalidArgument, ResourceExhausted
from serve.model.llama import LlamaForCausalLM

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
        logger.info(
            "engine ready: %d KV blocks of %d tokens, max_model_len %d",
            num_blocks,
            config.block_size,
            self.max_model_len,
        )

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> Request:
        """A validated Request (reads only immutable engine state)."""
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
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        return Request(request_id, list(prompt_token_ids), sampling, self.eos_token_ids, seed)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.scheduler.requests:
            raise InvalidArgument(f"request_id {request.request_id!r} is already running")
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
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
        result = self.runner.execute(out, self.kv.req_blocks)
        return self.scheduler.update(out, result.sampled)

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


class AsyncEngine:
    """Runs an LLMEngine on a dedicated thread; requests stream via asyncio queues."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[str, object]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams only
        self._stopped = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; the last one has a finish reason.
        Leaving the iteration early (cancel, close) aborts the request."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        request = self.engine.make_request(request_id, prompt_token_ids, sampling)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise InvalidArgument(f"request_id {request_id!r} is already running")
            self._streams[request_id] = (loop, outputs)
        self._commands.put(("add", request))
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
                self.engine.add_request(arg)  # type: ignore[arg-type]
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
