"""serve.gateway.sessions: ids, busy turns, limits, LRU eviction and idle expiry."""

from __future__ import annotations

import pytest

from serve.config import SessionConfig
from serve.errors import FailedPrecondition, NotFound, ResourceExhausted
from serve.gateway.conversation import Conversation
from serve.gateway.prompts import ChatMessage
from serve.gateway.sessions import Session, SessionStore
from serve.model.tokenizer import Tokenizer

BUILTIN = Tokenizer.builtin()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, **limits: float) -> SessionStore:
    config = SessionConfig(**limits)  # type: ignore[arg-type]
    return SessionStore(config, lambda: Conversation(BUILTIN), clock)


def _answered(store: SessionStore, session: Session, text: str = "hi") -> Session:
    """Ends a turn that added a user message and an answer."""
    conv = session.conversation
    conv.append(conv.prompt([ChatMessage("user", text)]), "hello", [])
    store.release(session)
    return session


def test_open_gives_random_ids_and_busy_sessions() -> None:
    store = _store(Clock())
    a, b = store.open(), store.open()
    assert a.session_id != b.session_id and len(a.session_id) == 32
    assert a.is_busy and b.is_busy and len(store) == 2
    _answered(store, a)
    assert not a.is_busy
    assert store.acquire(a.session_id) is a and a.is_busy


def test_one_turn_at_a_time() -> None:
    store = _store(Clock())
    session = _answered(store, store.open())
    store.acquire(session.session_id)
    with pytest.raises(FailedPrecondition, match="turn in progress"):
        store.acquire(session.session_id)


def test_a_session_whose_first_turn_failed_is_dropped() -> None:
    store = _store(Clock())
    session = store.open()
    store.release(session)  # nothing was answered
    assert session.session_id not in store and len(store) == 0


def test_not_found_says_why() -> None:
    clock = Clock()
    store = _store(clock, idle_timeout_s=10.0, max_sessions=2)
    with pytest.raises(NotFound, match="never opened"):
        store.acquire("nope")
    closed = _answered(store, store.open())
    assert store.close(closed.session_id) is closed
    assert store.close(closed.session_id) is None
    with pytest.raises(NotFound, match="closed"):
        store.acquire(closed.session_id)
    idle = _answered(store, store.open())
    clock.now += 10.0
    with pytest.raises(NotFound, match="expired"):
        store.acquire(idle.session_id)


def test_idle_sessions_expire_but_busy_ones_stay() -> None:
    clock = Clock()
    store = _store(clock, idle_timeout_s=10.0)
    old = _answered(store, store.open())
    busy = store.open()
    clock.now += 5.0
    recent = _answered(store, store.open())
    clock.now += 6.0  # old: 11 s idle, recent: 6 s, busy: in a turn
    assert store.expire() == 1
    assert old.session_id not in store and old.is_closed
    assert recent.session_id in store and busy.session_id in store
    clock.now += 20.0
    assert store.expire() == 1  # recent; the busy one stays
    assert busy.session_id in store


def test_a_used_session_moves_to_the_back_of_the_lru() -> None:
    clock = Clock()
    store = _store(clock, max_sessions=3)
    a, b, c = (_answered(store, store.open()) for _ in range(3))
    clock.now += 1
    _answered(store, store.acquire(a.session_id), "again")  # b is now the oldest
    d = store.open()
    assert b.session_id not in store and b.is_closed
    assert {a.session_id, c.session_id, d.session_id} <= set(store._sessions)
    with pytest.raises(NotFound, match="evicted"):
        store.acquire(b.session_id)


def test_a_full_store_of_busy_sessions_refuses_new_ones() -> None:
    store = _store(Clock(), max_sessions=2)
    first, _ = store.open(), store.open()
    with pytest.raises(ResourceExhausted, match="2 sessions, all in a turn"):
        store.open()
    _answered(store, first)
    store.open()  # evicts the idle one
    assert first.session_id not in store


def test_turn_limits() -> None:
    store = _store(Clock(), max_turn_bytes=10, max_bytes=24, max_turns=5)
    session = store.open()
    with pytest.raises(ResourceExhausted, match="messages hold 11 bytes of text"):
        store.check_turn([ChatMessage("user", "x" * 11)], None)
    store.check_turn([ChatMessage("user", "é" * 5)], session)  # 10 bytes
    _answered(store, session, "1234567890")  # 10 + 5 ("hello") bytes, 2 messages
    store.acquire(session.session_id)
    with pytest.raises(ResourceExhausted, match="would hold 25 bytes of text, at most 24"):
        store.check_turn([ChatMessage("user", "x" * 10)], session)
    two = [ChatMessage("system", "s"), ChatMessage("user", "u")]
    with pytest.raises(ResourceExhausted, match="would hold 6 messages, at most 5"):
        store.check_turn([*two, ChatMessage("user", "v")], session)
    store.check_turn([ChatMessage("user", "ok")], session)


def test_closing_a_busy_session_keeps_it_closed() -> None:
    store = _store(Clock())
    session = _answered(store, store.open())
    store.acquire(session.session_id)
    store.close(session.session_id)
    store.release(session)
    assert session.session_id not in store


def test_forgotten_ids_are_bounded() -> None:
    store = _store(Clock(), max_sessions=16)
    for _ in range(40):
        store.close(_answered(store, store.open()).session_id)
    assert len(store._gone) == 16
