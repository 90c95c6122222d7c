"""Chat sessions (`append_only`) through real in-process servers, tiny model.

Two replicas with prefix caching behind the session gateway, and a reference
gateway over a replica without prefix caching that gets the whole history each
turn: answers must match, the session's turns stay on one replica and reuse
its KV prefix."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from clients.cli import build_parser, chat_repl
from clients.client import Chunk, Client
from serve.config import SessionConfig
from serve.gateway import servicer as gateway_servicer
from serve.gateway.conversation import Conversation
from serve.model.tokenizer import Tokenizer
from tests.fixtures.servers import Servers, servers, shard_status

BUILTIN = Tokenizer.builtin()
BLOCK_SIZE = 16
TURNS = (
    "Hello, who are you?",
    "Tell me about the weather today, in a few words.",
    "And tomorrow?",
    "What should I wear for a walk in the park?",
    "Thanks, that is all for now. Bye!",
)
SESSIONS = SessionConfig(max_sessions=4, max_turn_bytes=600, max_turns=40)


class Stack:
    def __init__(self, s: Servers) -> None:
        self.servers = s
        self.replicas = [s.shard(), s.shard()]
        self.reference_replica = s.shard(enable_prefix_caching=False)
        self.gateway = s.gateway(self.replicas, sessions=SESSIONS)
        self.reference = s.gateway([self.reference_replica])


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    for s in servers():
        yield Stack(s)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.gateway, timeout=30) as c:
        yield c


def _text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def _counters(addresses: list[str]) -> list[tuple[int, int]]:
    """(prefix-cache query tokens, hit tokens) of each replica."""
    out = []
    for address in addresses:
        status = shard_status(address)
        out.append((status.prefix_cache_query_tokens, status.prefix_cache_hit_tokens))
    return out


def _resend_answers(address: str, turns: tuple[str, ...], max_tokens: int) -> list[str]:
    """Greedy answers when each turn carries the whole history."""
    history: list[dict[str, str]] = []
    answers = []
    with Client(address, timeout=30) as c:
        for turn in turns:
            history.append({"role": "user", "content": turn})
            answer = _text(list(c.chat(history, max_tokens=max_tokens, temperature=0.0)))
            history.append({"role": "assistant", "content": answer})
            answers.append(answer)
    return answers


def test_session_sends_only_new_turns_and_reuses_the_kv_prefix(
    stack: Stack, client: Client
) -> None:
    expected = _resend_answers(stack.reference, TURNS, max_tokens=24)
    session_id = ""
    previous: tuple[int, int] | None = None  # (prompt tokens, completion tokens)
    replica_used: set[int] = set()
    for i, turn in enumerate(TURNS):
        before = _counters(stack.replicas)
        chunks = list(
            client.chat(
                turn, session_id=session_id, append_only=True, max_tokens=24, temperature=0.0
            )
        )
        after = _counters(stack.replicas)
        assert len({c.session_id for c in chunks}) == 1
        session_id = chunks[0].session_id
        assert len(session_id) == 32
        assert _text(chunks) == expected[i], f"turn {i + 1}"
        usage = chunks[-1].usage
        assert usage is not None
        replica_used |= {k for k in range(2) if after[k][0] > before[k][0]}
        if previous is not None:
            # The previous prompt and all but the last block of its answer are cached.
            prev_prompt, prev_completion = previous
            assert usage.cached_prompt_tokens >= prev_prompt // BLOCK_SIZE * BLOCK_SIZE
            assert sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) == (
                usage.cached_prompt_tokens
            )
            # Prefill is the new turn (plus template markers) and the uncached tail.
            new_turn_tokens = len(turn.encode()) + 4
            prefill = usage.prompt_tokens - usage.cached_prompt_tokens
            assert prefill <= new_turn_tokens + prev_completion + BLOCK_SIZE
            assert prefill < usage.prompt_tokens / 2 or i == 1
        previous = (usage.prompt_tokens, usage.completion_tokens)
    assert len(replica_used) == 1, "a session's turns stay on one replica"
    assert client.close_session(session_id) is True
    assert client.close_session(session_id) is False


def test_first_turn_may_carry_a_system_message(stack: Stack, client: Client) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
    ]
    first = list(client.chat(messages, append_only=True, max_tokens=8, temperature=0.0))
    session_id = first[-1].session_id
    second = list(
        client.chat("More?", session_id=session_id, append_only=True, max_tokens=8, temperature=0)
    )
    with Client(stack.reference, timeout=30) as ref:
        full = [*messages, {"role": "assistant", "content": _text(first)}]
        full.append({"role": "user", "content": "More?"})
        reference = list(ref.chat(full, max_tokens=8, temperature=0.0))
    assert _text(second) == _text(reference)
    assert second[-1].usage is not None and reference[-1].usage is not None
    assert second[-1].usage.prompt_tokens == reference[-1].usage.prompt_tokens
    client.close_session(session_id)


def test_cancelled_turn_leaves_the_session_unchanged(stack: Stack, client: Client) -> None:
    first = list(client.chat("Start", append_only=True, max_tokens=6, temperature=0.0))
    session_id = first[-1].session_id
    stream = client.chat(
        "Long answer please", session_id=session_id, append_only=True, max_tokens=500,
        ignore_eos=True,
    )  # fmt: skip
    next(stream)
    stream.close()  # cancels the turn
    again = list(
        client.chat("Next", session_id=session_id, append_only=True, max_tokens=6, temperature=0)
    )
    expected = BUILTIN.encode_chat(
        [
            {"role": "user", "content": "Start"},
            {"role": "assistant", "content": _text(first)},
            {"role": "user", "content": "Next"},
        ]
    )
    assert again[-1].usage is not None and again[-1].usage.prompt_tokens == len(expected)
    client.close_session(session_id)


def _code(call: Iterator[Chunk]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value.code(), info.value.details()  # type: ignore[attr-defined]


def test_unknown_and_closed_sessions_are_not_found(client: Client) -> None:
    code, details = _code(client.chat("hi", session_id="nope", append_only=True))
    assert code == grpc.StatusCode.NOT_FOUND and "session_id 'nope'" in details
    session_id = list(client.chat("hi", append_only=True, max_tokens=2))[-1].session_id
    assert client.close_session(session_id)
    code, details = _code(client.chat("hi", session_id=session_id, append_only=True))
    assert code == grpc.StatusCode.NOT_FOUND and "closed" in details
    with pytest.raises(grpc.RpcError) as info:
        client.close_session("")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_limits_give_clear_status_codes(stack: Stack, client: Client) -> None:
    code, details = _code(client.chat("x" * 601, append_only=True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "messages hold 601 bytes" in details
    # A session on which a turn is running refuses a second one.
    session_id = list(client.chat("hi", append_only=True, max_tokens=2))[-1].session_id
    running = client.chat(
        "go", session_id=session_id, append_only=True, max_tokens=500, ignore_eos=True
    )
    next(running)
    code, details = _code(client.chat("too", session_id=session_id, append_only=True))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in details
    running.close()


def _open_session(c: Client, turn: str, timeout_s: float = 10.0) -> str:
    """A new session's id, retrying while cancelled turns still hold their slots."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return list(c.chat(turn, append_only=True, max_tokens=2))[-1].session_id
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise
            time.sleep(0.05)


def test_too_many_sessions_then_lru_eviction(stack: Stack) -> None:
    """max_sessions = 4: with four turns running a fifth session is refused; once
    they ended, a new session evicts the least recently used one."""
    gateway = stack.servers.gateway(stack.replicas, sessions=SESSIONS)
    with Client(gateway, timeout=30) as c:
        streams = [c.chat("go", append_only=True, max_tokens=500, ignore_eos=True) for _ in "abcd"]
        ids = [next(s).session_id for s in streams]
        code, details = _code(c.chat("one more", append_only=True))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions" in details
        for s in streams:  # first turns cancelled: those sessions are gone
            s.close()
        ids = [_open_session(c, f"s{i}") for i in "abcd"]
        list(c.chat("again", session_id=ids[0], append_only=True, max_tokens=2))  # ids[1] is LRU
        list(c.chat("new", append_only=True, max_tokens=2))
        code, details = _code(c.chat("hi", session_id=ids[1], append_only=True))
        assert code == grpc.StatusCode.NOT_FOUND and "evicted" in details
        for session_id in (ids[0], ids[2], ids[3]):
            assert list(c.chat("ok", session_id=session_id, append_only=True, max_tokens=2))


def test_session_moves_when_its_replica_dies(stack: Stack) -> None:
    """The replica holding a session stops; the next turn is rebuilt from the kept
    conversation on the other replica, with the same answer, and later turns
    reuse the new replica's cache."""
    s = stack.servers
    replicas = [s.shard(), s.shard()]
    gateway = s.gateway(replicas, status_poll_interval_s=0.1)
    expected = _resend_answers(stack.reference, TURNS[:4], max_tokens=12)
    with Client(gateway, timeout=30) as c:
        session_id = ""
        for i, turn in enumerate(TURNS[:4]):
            if i == 2:
                (holder,) = [a for a in replicas if shard_status(a).prefix_cache_query_tokens]
                s.stop_shard(holder)
            chunks = list(
                c.chat(turn, session_id=session_id, append_only=True, max_tokens=12, temperature=0)
            )
            session_id = chunks[-1].session_id
            assert _text(chunks) == expected[i], f"turn {i + 1}"
            usage = chunks[-1].usage
            assert usage is not None
            if i == 2:
                assert usage.cached_prompt_tokens == 0  # rebuilt on the survivor
            if i == 3:
                assert usage.cached_prompt_tokens > 0


def test_concurrent_sessions_do_not_mix(stack: Stack) -> None:
    results: dict[int, list[str]] = {}

    def dialogue(k: int) -> None:
        with Client(stack.gateway, timeout=30) as c:
            session_id, answers = "", []
            for turn in (f"User {k} says hello", f"User {k} again"):
                chunks = list(
                    c.chat(turn, session_id=session_id, append_only=True, max_tokens=8, seed=k)
                )
                session_id = chunks[-1].session_id
                answers.append(_text(chunks))
            c.close_session(session_id)
            results[k] = answers

    threads = [threading.Thread(target=dialogue, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1, 2]
    with Client(stack.reference, timeout=30) as ref:
        for k, answers in results.items():
            history = [{"role": "user", "content": f"User {k} says hello"}]
            first = _text(list(ref.chat(history, max_tokens=8, seed=k)))
            history += [{"role": "assistant", "content": first}]
            history += [{"role": "user", "content": f"User {k} again"}]
            second = _text(list(ref.chat(history, max_tokens=8, seed=k)))
            assert answers == [first, second]


class _SlowLines(io.StringIO):
    """stdin whose lines after the first come `delay_s` late."""

    def __init__(self, text: str, delay_s: float) -> None:
        super().__init__(text)
        self._delay_s = delay_s
        self._num_read = 0

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        if self._num_read:
            time.sleep(self._delay_s)
        self._num_read += 1
        return super().readline()


def test_repl_reopens_a_session_the_gateway_dropped(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = stack.servers.gateway(stack.replicas, sessions=SessionConfig(idle_timeout_s=0.3))
    args = build_parser().parse_args(["chat", "--max-tokens", "4", "--temperature", "0"])
    out = io.StringIO()
    with Client(gateway, timeout=30) as c:
        history = chat_repl(c, args, _SlowLines("hello\nagain\n", 0.6), out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert "session expired on the gateway" in capsys.readouterr().err
    with Client(stack.reference, timeout=30) as ref:
        expected = _text(list(ref.chat(history[:3], max_tokens=4, temperature=0.0)))
    assert history[3]["content"] == expected


def _turn(
    stub: inference_pb2_grpc.InferenceStub, text: str, session_id: str = "", cancel: bool = False
) -> inference_pb2.GenerateChunk:
    """One append_only turn's last chunk; with `cancel`, the call is cancelled as soon
    as that chunk arrives (while the gateway still commits the turn)."""
    request = inference_pb2.ChatRequest(
        messages=[inference_pb2.ChatMessage(role="user", content=text)],
        session_id=session_id,
        append_only=True,
        sampling=inference_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    call = stub.Chat(request, timeout=30)
    last = None
    for chunk in call:  # to the end of the call: the turn is committed by then
        if chunk.finish_reason:
            last = chunk
            if cancel:
                call.cancel()
                break
    assert last is not None, "the turn ended without a last chunk"
    return last


def test_a_turn_cancelled_while_it_commits_leaves_the_session_as_it_was(monkeypatch) -> None:
    """A long conversation's next state is built off the event loop. A client that
    cancels then (right after the last chunk) must leave the session without that
    turn, and not have it land later behind the next turn's back."""
    monkeypatch.setattr(gateway_servicer, "OFF_LOOP_CHARS", 100)
    appended = Conversation.appended

    def slow(self: Conversation, *args: object) -> object:
        time.sleep(0.5)  # a long conversation's tokenization
        return appended(self, *args)

    monkeypatch.setattr(Conversation, "appended", slow)
    for s in servers():
        with grpc.insecure_channel(s.gateway([s.shard()])) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            first = "x" * 120
            moved, control = _turn(stub, first).session_id, _turn(stub, first).session_id
            _turn(stub, "A second turn.", moved, cancel=True)
            time.sleep(1.0)  # the cancelled turn's state is built by now
            # Both sessions hold the first turn only: their next prompts are alike.
            after_cancel = _turn(stub, "Third.", moved).usage.prompt_tokens
            assert after_cancel == _turn(stub, "Third.", control).usage.prompt_tokens
