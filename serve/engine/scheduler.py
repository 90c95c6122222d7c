"""Continuous batching: each step fills a token budget, decodes first, then
prefill chunks; when KV blocks run out the newest running request is
preempted (its KV is dropped and recomputed later)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from serve.config import EngineConfig
from serve.engine.kv_cache import KVCacheManager
from serve.engine.request import FinishReason, Request, RequestOutput, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerOutput:
    """One step's work: decodes (one token each) then prefill chunks."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Decodes first, then running requests still in prefill, oldest first.
        order = sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1)
        scheduled: list[Request] = []
        for req in order:
            if req.status is not RequestStatus.RUNNING or budget <= 0:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self._pick_victim(exclude=scheduled)
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                scheduled.append(req)
                budget -= n
                self._emit(out, req, n)
        # Then admit waiting requests while the budget and the pool allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached_blocks, cached_keys = [], []
            if req.num_computed_tokens == 0:
                cached_blocks, cached_keys = self.kv.find_cached_prefix(req)
                num_cached = len(cached_blocks) * self.kv.block_size
            else:  # KV imported from another replica already sits in its blocks
                num_cached = req.num_computed_tokens
            n = min(req.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(req, n, cached_blocks, cached_keys):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_cached
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= n
            self._emit(out, req, n)
        return out

    def _emit(self, out: SchedulerOutput, req: Request, n: int) -> None:
        if n == 1 and req.num_computed_tokens == req.num_tokens - 1:
            out.decodes.append(req)
        else:
            out.prefills.append((req, n))

    def _pick_victim(self, exclude: list[Request]) -> Request:
        """The newest running request not already scheduled this step, else the newest."""
        for req in reversed(self.running):
            if req.status is RequestStatus.RUNNING and req not in exclude:
                return req
        return self.running[-1]

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.kv.free(req)
        self.running.remove(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        logger.info("request %s preempted (KV blocks exhausted)", req.request_id)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        """Advances the scheduled requests by this step's results."""
        outputs: list[RequestOutput] = []
        for req, n in [(r, 1) for r in out.decodes] + out.prefills:
            if req.status is not RequestStatus.RUNNING:
                continue
            req.num_computed_tokens += n
            self.kv.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            req.output_token_ids.append(token)
            reason = self._check_stop(req, token)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, (token,), reason))
        return outputs

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        sp = req.sampling
        if not sp.ignore_eos and token in req.eos_token_ids:
            return FinishReason.STOP
        if token in sp.stop_token_ids:
            return FinishReason.STOP
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.kv.free(req)
        if req in self.running:
            self.running.remove(req)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        self.requests.pop(req.request_id, None)

    def remove(self, request_id: str) -> Request | None:
        """Takes a request out of scheduling, keeping its KV blocks (it is being
        handed over); None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request at once and frees its blocks; None if unknown."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT)
        return self._output(req, (), FinishReason.ABORT)

    @staticmethod
    def _output(
        req: Request, tokens: tuple[int, ...], reason: FinishReason | None
    ) -> RequestOutput:
        start = req.first_scheduled_time or time.monotonic()
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            queue_s=max(0.0, start - req.arrival_time),
            num_output_tokens=req.num_output_tokens,
        )
