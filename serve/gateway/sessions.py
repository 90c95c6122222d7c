"""Chat sessions kept by the gateway for `append_only` calls.

A session holds a `Conversation` (text and exact token ids) and the replica that
served its last turn. The store is bounded: at most `max_sessions` at once (a new
session evicts the least recently used idle one; when every session is in a turn,
opening one is refused with RESOURCE_EXHAUSTED), sessions unused for
`idle_timeout_s` are dropped, and each session holds at most `max_turns` messages
and `max_bytes` of text. A turn is atomic: the new messages and the answer join
the conversation only when the answer finished, so a failed or cancelled turn can
be sent again. One turn at a time per session: a second concurrent turn is refused
with FAILED_PRECONDITION. Ids are random (128 bits) and only their holder can use
a session.

Status codes: a session the store does not hold gives NOT_FOUND, whether it was
closed, expired, evicted or never opened (the message says which when the store
still remembers it); the client starts a new session with the whole conversation.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from serve.config import SessionConfig
from serve.errors import FailedPrecondition, NotFound, ResourceExhausted
from serve.gateway.conversation import Conversation, message_bytes
from serve.gateway.prompts import ChatMessage

logger = logging.getLogger(__name__)

CLOSED = "closed"
EXPIRED = "expired after being idle"
EVICTED = "evicted to make room for newer sessions"


@dataclass
class Session:
    session_id: str
    conversation: Conversation
    last_used: float
    # Address of the replica that served the last turn ("" before the first).
    replica: str = ""
    is_busy: bool = False
    is_closed: bool = False
    num_answers: int = 0


class SessionStore:
    """Sessions by id, least recently used first."""

    def __init__(
        self,
        config: SessionConfig,
        new_conversation: Callable[[], Conversation],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._new_conversation = new_conversation
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        # Why recently dropped sessions went, for clearer NOT_FOUND messages.
        self._gone: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def open(self) -> Session:
        """A new empty session, marked busy (its first turn is starting)."""
        self.expire()
        if len(self._sessions) >= self.config.max_sessions:
            victim = next((s for s in self._sessions.values() if not s.is_busy), None)
            if victim is None:
                raise ResourceExhausted(
                    f"the gateway holds {len(self._sessions)} sessions, all in a turn "
                    f"(limit {self.config.max_sessions}); retry later"
                )
            self._drop(victim, EVICTED)
        session_id = secrets.token_hex(16)
        session = Session(session_id, self._new_conversation(), self._clock(), is_busy=True)
        self._sessions[session_id] = session
        logger.debug("session %s opened (%d held)", session_id, len(self._sessions))
        return session

    def acquire(self, session_id: str) -> Session:
        """The session, marked busy for a turn: NOT_FOUND if not held,
        FAILED_PRECONDITION if a turn is in progress."""
        self.expire()
        session = self._sessions.get(session_id)
        if session is None:
            reason = self._gone.get(session_id)
            detail = f"it was {reason}" if reason else "it was never opened or is long gone"
            raise NotFound(
                f"session_id {session_id!r} is not held by this gateway ({detail}); "
                "open a new session by sending the whole conversation with append_only "
                "and an empty session_id"
            )
        if session.is_busy:
            raise FailedPrecondition(
                f"session_id {session_id!r} has a turn in progress; send the next turn "
                "after its answer finished"
            )
        session.is_busy = True
        session.last_used = self._clock()
        self._sessions.move_to_end(session_id)
        return session

    def check_turn(self, new_messages: Sequence[ChatMessage], session: Session | None) -> None:
        """RESOURCE_EXHAUSTED when the new messages would take the session (None: a new
        one) past a limit."""
        c = self.config
        turn_bytes = message_bytes(new_messages)
        if turn_bytes > c.max_turn_bytes:
            raise ResourceExhausted(
                f"messages hold {turn_bytes} bytes of text, an append_only turn may add "
                f"at most {c.max_turn_bytes}"
            )
        if session is None:
            session = Session("", self._new_conversation(), 0.0)
        conv = session.conversation
        # +1: the answer joins too.
        num_turns = len(conv.messages) + len(new_messages) + 1
        if num_turns > c.max_turns:
            raise ResourceExhausted(
                f"session_id {session.session_id!r} would hold {num_turns} messages, at most "
                f"{c.max_turns} allowed; close it and open a new session"
            )
        if conv.num_bytes + turn_bytes > c.max_bytes:
            raise ResourceExhausted(
                f"session_id {session.session_id!r} would hold {conv.num_bytes + turn_bytes} "
                f"bytes of text, at most {c.max_bytes} allowed; close it and open a new session"
            )

    def release(self, session: Session) -> None:
        """Ends the session's turn. A session whose first turn failed is dropped."""
        session.is_busy = False
        session.last_used = self._clock()
        if session.is_closed:
            return
        if not session.conversation.messages:
            self._drop(session, CLOSED)
            return
        self._sessions.move_to_end(session.session_id)

    def close(self, session_id: str) -> Session | None:
        """Drops the session (a turn in progress still finishes); None if not held."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        self._drop(session, CLOSED)
        return session

    def expire(self) -> int:
        """Drops idle sessions past the idle timeout; returns how many."""
        cutoff = self._clock() - self.config.idle_timeout_s
        expired: list[Session] = []
        # Least recently used first, so the scan stops at the first recent idle session.
        for s in self._sessions.values():
            if s.is_busy:
                continue
            if s.last_used > cutoff:
                break
            expired.append(s)
        for session in expired:
            self._drop(session, EXPIRED)
        return len(expired)

    def _drop(self, session: Session, reason: str) -> None:
        session.is_closed = True
        del self._sessions[session.session_id]
        self._gone[session.session_id] = reason
        while len(self._gone) > max(self.config.max_sessions, 16):
            self._gone.popitem(last=False)
        logger.debug("session %s %s (%d held)", session.session_id, reason, len(self._sessions))
