"""A request as the engine sees it: token ids in, token ids out."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the client or the server
    MIGRATED = "migrated"  # handed over to another replica, which goes on with it


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    # Seed of the counter-based RNG (drawn at random when the client gave none).
    seed: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # Tokens whose KV is in the cache (computed or taken from the prefix cache).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission.
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    # False once the request's KV came through a lossy codec: its blocks then stay
    # out of the prefix cache, so no other request reuses approximate KV.
    kv_exact: bool = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    def state(self) -> RequestState:
        """What another replica needs to go on with this request (its KV aside)."""
        return RequestState(
            request_id=self.request_id,
            prompt_token_ids=tuple(self.prompt_token_ids),
            output_token_ids=tuple(self.output_token_ids),
            sampling=self.sampling,
            seed=self.seed,
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            queue_s=max(0.0, (self.first_scheduled_time or self.arrival_time) - self.arrival_time),
        )


@dataclass(frozen=True)
class RequestState:
    """A request in flight, as it moves between replicas: its tokens so far, its
    sampling (the seed and the number of outputs fix every later random draw) and
    how many tokens have KV. The target continues exactly where the source stopped."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling: SamplingParams
    seed: int
    num_computed_tokens: int
    num_cached_tokens: int = 0
    queue_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_s: float = 0.0
    # The request's output tokens so far, these included.
    num_output_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
