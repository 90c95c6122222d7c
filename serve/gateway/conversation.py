"""A conversation kept by the gateway as text and as the exact token ids sent so far.

A replica's prefix cache only helps turn N+1 if its prompt starts with the token
ids of turn N's prompt and answer. Re-rendering and re-tokenizing the whole
conversation each turn does not promise that: the model's own tokenization of its
answer may differ from the tokenizer's, and a BPE boundary may merge differently.
So a `Conversation` keeps the ids of everything rendered so far and, for the next
turn, renders the whole conversation with the chat template, checks that the text
kept so far is a prefix of it, and tokenizes only the new tail. After the answer
it appends the answer's ids (the model's own, when they spell exactly the text the
client received; otherwise the text re-tokenized) and the template's closing text
(e.g. `<|end|>`). Templates that render earlier turns differently once a new turn
follows (dates, dropped reasoning) fail the prefix check; such a turn is tokenized
whole, which is correct but reuses less of the cache.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from serve.gateway.prompts import ChatMessage, render_chat
from serve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class TurnPrompt:
    """The prompt of one turn: the conversation so far plus the new messages."""

    messages: tuple[ChatMessage, ...]
    # Rendered text, ending with the assistant's generation prompt.
    text: str
    token_ids: tuple[int, ...]
    # Leading ids taken unchanged from the kept conversation.
    num_kept_tokens: int


def message_bytes(messages: Sequence[ChatMessage]) -> int:
    """UTF-8 size of the messages' text."""
    return sum(len(m.content.encode("utf-8")) for m in messages)


class Conversation:
    """Messages plus the token ids of their rendering (without a generation prompt)."""

    def __init__(self, tokenizer: Tokenizer, messages: Sequence[ChatMessage] = ()) -> None:
        self._tokenizer = tokenizer
        self.messages: tuple[ChatMessage, ...] = ()
        self._text = ""
        self._ids = array("I")
        self.num_bytes = 0
        if messages:
            self._reset(tuple(messages))

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def prompt(self, new_messages: Sequence[ChatMessage]) -> TurnPrompt:
        """The next turn's prompt: kept ids plus the tokenized tail when the template
        renders the kept conversation unchanged, else the whole text tokenized."""
        messages = (*self.messages, *new_messages)
        text = render_chat(self._tokenizer, messages, add_generation_prompt=True)
        if text.startswith(self._text):
            tail = self._tokenizer.encode(text[len(self._text) :], add_special_tokens=False)
            ids = (*self._ids, *tail)
            kept = len(self._ids)
        else:
            logger.debug("chat template re-rendered earlier turns; tokenizing the whole turn")
            ids = tuple(self._tokenizer.encode(text, add_special_tokens=False))
            kept = 0
        return TurnPrompt(messages, text, ids, kept)

    def append(self, turn: TurnPrompt, answer: str, answer_ids: Sequence[int]) -> None:
        """Makes the turn and its answer part of the conversation.

        `answer` is the text the client received (after stop strings); `answer_ids`
        the ids the model generated for it (an end-of-sequence id may end them)."""
        self.commit(self.appended(turn, answer, answer_ids))

    def appended(
        self, turn: TurnPrompt, answer: str, answer_ids: Sequence[int]
    ) -> tuple[tuple[ChatMessage, ...], str, Sequence[int]]:
        """What `append` would make the conversation, without changing it (safe on
        another thread; `commit` applies it)."""
        messages = (*turn.messages, ChatMessage("assistant", answer))
        text = render_chat(self._tokenizer, messages, add_generation_prompt=False)
        start = len(turn.text)
        if not (text.startswith(turn.text) and text[start:].startswith(answer)):
            logger.debug("chat template does not extend the prompt; tokenizing the whole turn")
            return messages, text, self._tokenizer.encode(text, add_special_tokens=False)
        closing = text[start + len(answer) :]
        ids = array("I", turn.token_ids)
        ids.extend(self._answer_ids(answer, answer_ids))
        ids.extend(self._tokenizer.encode(closing, add_special_tokens=False))
        return messages, text, ids

    def commit(self, state: tuple[tuple[ChatMessage, ...], str, Sequence[int]]) -> None:
        self._set(*state)

    def _answer_ids(self, answer: str, generated: Sequence[int]) -> Sequence[int]:
        """The model's ids when they spell exactly `answer`; else `answer` tokenized.

        A replacement character may stand for invalid bytes the model produced,
        which the client never saw: such an answer is always re-tokenized."""
        ids = list(generated)
        if ids and ids[-1] in self._tokenizer.eos_token_ids:
            ids.pop()
        spelled = self._tokenizer.decode(ids, skip_special_tokens=False)
        if REPLACEMENT_CHAR not in answer and spelled == answer:
            return ids
        return self._tokenizer.encode(answer, add_special_tokens=False)

    def _reset(self, messages: tuple[ChatMessage, ...]) -> None:
        text = render_chat(self._tokenizer, messages, add_generation_prompt=False)
        self._set(messages, text, self._tokenizer.encode(text, add_special_tokens=False))

    def _set(self, messages: tuple[ChatMessage, ...], text: str, ids: Sequence[int]) -> None:
        self.messages = messages
        self._text = text
        self._ids = ids if isinstance(ids, array) else array("I", ids)
        self.num_bytes = message_bytes(messages)
