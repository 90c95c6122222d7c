"""Incremental detokenizing and stop strings.

`IncrementalDetokenizer` turns generated token ids into text pieces that never
end inside a UTF-8 character: a decode that ends in U+FFFD may be a character
whose remaining bytes are still to come, so that tail is held back. It decodes
a short window of recent tokens (prefix/read offsets) rather than the whole
completion each step. The pieces add up to the decode of all the ids (for
byte-fallback vocabularies fed invalid bytes, up to where replacement
characters fall).

`StopStringMatcher` holds back text that could be the start of a stop string
and cuts the output at the first match.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
# An unfinished UTF-8 character has at most 3 of its bytes, so it lies within the
# last 3 tokens; a replacement run that survives dropping them is not waiting.
MAX_UNFINISHED_TOKENS = 3
# Pending tokens after which the decode window is moved up to a clean split.
MAX_WINDOW_TOKENS = 8


class TextDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def _trailing_replacements(text: str) -> int:
    return len(text) - len(text.rstrip(REPLACEMENT_CHAR))


class IncrementalDetokenizer:
    """Text of a growing list of token ids, emitted piece by piece.

    The window `ids[prefix_offset:]` is decoded each step; `emitted` is the part
    of its text already returned, and `read_offset` is the first token after the
    last point where the decoded text ended cleanly. Trailing U+FFFD is held
    back while the last few tokens may still finish a character; once dropping
    those tokens leaves the run in place, it comes from invalid bytes and all but
    its last character are released, so output from random-weight models flows.
    """

    def __init__(self, tokenizer: TextDecoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted = ""

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(
            self._ids[start:end], skip_special_tokens=self._skip_special_tokens
        )

    def step(self, new_ids: Sequence[int]) -> str:
        """Adds token ids; returns the text that became final."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        text = self._decode(self._prefix_offset)
        held = _trailing_replacements(text)
        if held == 0:
            return self._advance(text)
        out = ""
        if text.startswith(self._emitted):
            out = self._emit_up_to(text, len(text) - held)
            if self._tail_is_invalid():
                # Only the last replacement character can still become a real one.
                out += self._emit_up_to(text, len(text) - 1)
        elif self._tail_is_invalid():
            logger.debug("invalid bytes changed emitted text; restarting the window")
            out = self._release(text)
        if len(self._ids) - self._read_offset > MAX_WINDOW_TOKENS:
            self._shrink_window(text)
        return out

    def flush(self) -> str:
        """The held tail, at the end of generation."""
        if self._prefix_offset == len(self._ids):
            return ""
        return self._release(self._decode(self._prefix_offset))

    def _emit_up_to(self, text: str, end: int) -> str:
        out = text[len(self._emitted) : end]
        self._emitted += out
        return out

    def _tail_is_invalid(self) -> bool:
        """Whether the trailing replacement run stays when the last tokens are dropped,
        so it cannot be a character still waiting for its bytes."""
        end = len(self._ids)
        if end - MAX_UNFINISHED_TOKENS <= self._prefix_offset:
            return False
        return all(
            self._decode(self._prefix_offset, end - k).endswith(REPLACEMENT_CHAR)
            for k in range(1, MAX_UNFINISHED_TOKENS + 1)
        )

    def _advance(self, text: str) -> str:
        """Emits all new text and starts the next window at the last clean point."""
        out = text[len(self._emitted) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._emitted = self._decode(self._prefix_offset, self._read_offset)
        return out

    def _release(self, text: str) -> str:
        """Emits the window's text beyond what was emitted, then restarts the window empty."""
        out = text[len(self._emitted) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._emitted = ""
        return out

    def _shrink_window(self, text: str) -> None:
        """Moves the window start to a later token where decoding splits exactly.

        A split is exact when decode(head) + decode(tail) == decode(head + tail),
        and only already-emitted text may lie before it.
        """
        for split in range(self._read_offset + 1, len(self._ids)):
            head = self._decode(self._prefix_offset, split)
            if len(head) > len(self._emitted):
                break
            tail = self._decode(split)
            if head + tail == text and text.startswith(head):
                self._prefix_offset = self._read_offset = split
                self._emitted = self._emitted[len(head) :]
                return


class StopStringMatcher:
    """Cuts streamed text at the first stop string; the stop string is not returned."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.matched: str | None = None

    @property
    def is_stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> str:
        """Adds text; returns what can be sent now. After a match returns ""."""
        if self.matched is not None:
            return ""
        if not self._stop:
            return text
        buffer = self._held + text
        # The stop string that completes first wins, as if text came one character at a
        # time; of those ending at the same place, the longest.
        first: tuple[int, int, str] | None = None
        for stop in self._stop:
            index = buffer.find(stop)
            if index < 0:
                continue
            candidate = (index + len(stop), index, stop)
            if first is None or candidate < first:
                first = candidate
        if first is not None:
            _, index, self.matched = first
            self._held = ""
            return buffer[:index]
        keep = self._longest_partial_match(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Releases held text at the end of generation."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
