"""Live translation: segments in, each segment's translation streamed out.

One `LiveTranslation` serves one `TranslateLive` stream. A reader task takes the
client's messages: pieces sent with `final` unset are joined, a final one
completes a segment and queues it. A worker translates queued segments one at a
time, in order, as turns of one growing conversation (the first user message
carries the instruction and the first segment; each later segment is a user
message answered by its translation), so the replica's prefix cache holds the
earlier segments and only the new one is prefilled (see `Conversation`).

The context is bounded: at most `context_segments` previous segments, and
never so many that the prompt plus max_tokens overflows the model's context.
When the bound is reached the oldest half is dropped at once, so the kept prefix
changes (and is prefilled again) once every context_segments / 2 segments rather
than at every segment.

Limits: a segment over `max_segment_bytes` gives RESOURCE_EXHAUSTED, and so does
a segment arriving while `max_pending_segments` are received but not yet
translated; an empty segment is INVALID_ARGUMENT. An error from either task ends
the stream with its status and cancels the translation in progress, which
aborts it on the replica and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from serve.config import LiveTranslateConfig
from serve.errors import InvalidArgument, ResourceExhausted
from serve.gateway.admission import SamplingParams
from serve.gateway.conversation import Conversation, TurnPrompt
from serve.gateway.generation import FinishReason, OutputChunk
from serve.gateway.prompts import ChatMessage, live_translation_instruction
from serve.gateway.record import RequestRecord
from serve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# (record, prompt ids, sampling, field named in errors, affinity key) -> output chunks
RunPrompt = Callable[
    [RequestRecord, Sequence[int], SamplingParams, str, str], AsyncIterator[OutputChunk]
]
# (segment index, arrival time) -> the segment's record, ended when the context exits
SegmentCall = Callable[[int, float], AbstractAsyncContextManager[RequestRecord]]
# (segment index, request id, chunk) -> sent to the client
Emit = Callable[[int, str, OutputChunk], Awaitable[None]]


@dataclass(frozen=True)
class LiveSettings:
    """The stream's validated first message."""

    source_lang: str
    target_lang: str
    sampling: SamplingParams
    context_segments: int
    max_model_len: int


@dataclass(frozen=True)
class SegmentInput:
    """One client message: text, and whether it completes the segment."""

    text: str
    final: bool


@dataclass(frozen=True)
class Segment:
    index: int
    text: str
    # time.monotonic() when the segment became final at the gateway.
    arrival: float


@dataclass(frozen=True)
class Pair:
    source: str
    translation: str


class LiveTranslation:
    def __init__(
        self,
        tokenizer: Tokenizer,
        settings: LiveSettings,
        limits: LiveTranslateConfig,
        *,
        run_prompt: RunPrompt,
        segment_call: SegmentCall,
        stream_id: str,
        log_prompts: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._settings = settings
        self._limits = limits
        self._run_prompt = run_prompt
        self._segment_call = segment_call
        self._stream_id = stream_id
        self._log_prompts = log_prompts
        self._queue: asyncio.Queue[Segment | None] = asyncio.Queue()
        self._pairs: list[Pair] = []
        self._conversation = Conversation(tokenizer)
        # Segments received and not yet translated (the one in progress included).
        self.num_pending = 0
        self.num_translated = 0

    async def run(self, incoming: AsyncIterator[SegmentInput], emit: Emit) -> None:
        """Serves the stream until the client half-closes and the last segment is
        translated; raises the first error of the reader or the worker."""
        reader = asyncio.create_task(self._read(incoming), name=f"live-read-{self._stream_id}")
        worker = asyncio.create_task(self._work(emit), name=f"live-work-{self._stream_id}")
        tasks = (reader, worker)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in (reader, worker):  # the reader's error first: it caused the end
                if task in done and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- reader ----------------------------------------------------------------------

    async def _read(self, incoming: AsyncIterator[SegmentInput]) -> None:
        parts: list[str] = []
        num_bytes = 0
        index = 0
        limit = self._limits.max_segment_bytes
        async for message in incoming:
            num_bytes += len(message.text.encode("utf-8"))
            if num_bytes > limit:
                raise ResourceExhausted(
                    f"segment.text of segment {index} is {num_bytes} bytes or more, "
                    f"at most {limit} allowed"
                )
            parts.append(message.text)
            if message.final:
                self._enqueue(index, "".join(parts))
                index += 1
                parts, num_bytes = [], 0
        if any(parts):  # half-close completes an open segment
            self._enqueue(index, "".join(parts))
        self._queue.put_nowait(None)

    def _enqueue(self, index: int, text: str) -> None:
        if not text:
            raise InvalidArgument(f"segment.text of segment {index} must not be empty")
        limit = self._limits.max_pending_segments
        if self.num_pending >= limit:
            raise ResourceExhausted(
                f"segment {index} arrived with {self.num_pending} segments not yet translated, "
                f"at most {limit} may wait; send segments no faster than they are translated"
            )
        self.num_pending += 1
        self._queue.put_nowait(Segment(index, text, time.monotonic()))

    # -- worker ----------------------------------------------------------------------

    async def _work(self, emit: Emit) -> None:
        while (segment := await self._queue.get()) is not None:
            await self._translate(segment, emit)
            self.num_pending -= 1
            self.num_translated += 1

    async def _translate(self, segment: Segment, emit: Emit) -> None:
        async with self._segment_call(segment.index, segment.arrival) as record:
            if self._log_prompts:
                logger.info("[%s] segment %d: %r", record.request_id, segment.index, segment.text)
            turn = self._prompt(segment.text)
            pieces: list[str] = []
            ids: list[int] = []
            finish: FinishReason | None = None
            outputs = self._run_prompt(
                record, turn.token_ids, self._settings.sampling, "segment.text", self._stream_id
            )
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    pieces.append(out.text)
                    ids.extend(out.token_ids)
                    finish = out.finish_reason or finish
                    await emit(segment.index, record.request_id, out)
            if finish in (FinishReason.STOP, FinishReason.LENGTH):
                translation = "".join(pieces)
                self._conversation.append(turn, translation, ids)
                self._pairs.append(Pair(segment.text, translation))
            logger.debug(
                "[%s] segment %d: %d prompt tokens, %d kept from the context of %d segments",
                record.request_id,
                segment.index,
                len(turn.token_ids),
                turn.num_kept_tokens,
                len(self._pairs),
            )

    def _prompt(self, text: str) -> TurnPrompt:
        """The segment's prompt, trimming the context to its bounds first."""
        s = self._settings
        keep = (s.context_segments + 1) // 2
        if len(self._pairs) > s.context_segments:
            self._trim(keep)
        while True:
            turn = self._conversation.prompt([self._user_message(text)])
            budget = s.max_model_len - (s.sampling.max_tokens or 0)
            if len(turn.token_ids) <= budget or not self._pairs:
                return turn
            self._trim(min(keep, len(self._pairs) // 2))

    def _user_message(self, text: str) -> ChatMessage:
        if self._conversation.messages:
            return ChatMessage("user", text)
        s = self._settings
        return ChatMessage("user", live_translation_instruction(text, s.source_lang, s.target_lang))

    def _trim(self, keep: int) -> None:
        """Keeps the last `keep` segments as the context, rebuilt from their text."""
        self._pairs = self._pairs[len(self._pairs) - keep :] if keep > 0 else []
        s = self._settings
        messages: list[ChatMessage] = []
        for i, pair in enumerate(self._pairs):
            source = pair.source
            if i == 0:
                source = live_translation_instruction(source, s.source_lang, s.target_lang)
            messages += [ChatMessage("user", source), ChatMessage("assistant", pair.translation)]
        self._conversation = Conversation(self._tokenizer, messages)
        logger.debug("live stream %s: context trimmed to %d segments", self._stream_id, keep)
