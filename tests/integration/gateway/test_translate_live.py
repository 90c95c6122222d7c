"""TranslateLive through real in-process servers, tiny model: tagged translations
in order, the previous segments as reused context, limits, cancel frees KV."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from clients.client import AsyncClient, Client, SegmentChunk
from serve.config import LiveTranslateConfig
from serve.gateway.prompts import live_translation_instruction
from tests.fixtures.servers import Servers, idle_free_blocks, servers, wait_free_blocks

SEGMENTS = tuple(
    f"Sentence number {i} of the talk, about {topic}."
    for i, topic in enumerate(
        ("trains", "rivers", "music", "bread", "snow", "maps", "clocks", "bees", "ink", "salt")
    )
)
LIVE = LiveTranslateConfig(max_pending_segments=4, max_segment_bytes=300, max_context_segments=16)


class Stack:
    def __init__(self, s: Servers) -> None:
        self.servers = s
        self.replica = s.shard()
        self.gateway = s.gateway([self.replica], live=LIVE)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    for s in servers():
        yield Stack(s)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.gateway, timeout=60) as c:
        yield c


def _by_segment(chunks: list[SegmentChunk]) -> list[list[SegmentChunk]]:
    """Chunks grouped per segment; checks they come in order, one segment at a time."""
    groups: list[list[SegmentChunk]] = []
    for chunk in chunks:
        if not groups or groups[-1][-1].is_last:
            assert chunk.segment_index == len(groups)
            groups.append([])
        assert chunk.segment_index == len(groups) - 1
        groups[-1].append(chunk)
    assert all(g[-1].is_last for g in groups)
    return groups


def _text(chunks: list[SegmentChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_ten_segments_come_back_tagged_in_order_with_reused_context(client: Client) -> None:
    chunks = list(
        client.translate_live(
            SEGMENTS, source="en", target="de", max_tokens=12, temperature=0.0,
            context_segments=16,
        )
    )  # fmt: skip
    groups = _by_segment(chunks)
    assert len(groups) == 10
    usages = [g[-1].usage for g in groups]
    assert all(u is not None and u.completion_tokens > 0 for u in usages)
    prompts = [u.prompt_tokens for u in usages if u is not None]
    assert prompts == sorted(prompts)  # the context grows
    for prev, u in zip(usages, usages[1:], strict=False):
        assert u is not None and prev is not None
        # Earlier segments come from the prefix cache; only about one segment is new.
        assert u.cached_prompt_tokens >= prev.prompt_tokens - 16
        assert u.prompt_tokens - u.cached_prompt_tokens <= 16 + prev.completion_tokens + 60
    for g in groups:
        timing = g[-1].timing
        assert timing is not None and 0 < timing.time_to_first_token_s <= timing.total_s

    # Segment k's translation is the chat answer to the conversation of segments < k.
    messages = []
    for k, segment in enumerate(SEGMENTS[:4]):
        text = live_translation_instruction(segment, "en", "de") if k == 0 else segment
        messages.append({"role": "user", "content": text})
        answer = _text(list(client.chat(messages, max_tokens=12, temperature=0.0)))
        assert answer == _text(groups[k]), f"segment {k}"
        messages.append({"role": "assistant", "content": answer})


def test_context_window_bounds_the_prompt(client: Client) -> None:
    chunks = list(
        client.translate_live(
            SEGMENTS, source="en", target="de", max_tokens=8, temperature=0.0, context_segments=2
        )
    )
    groups = _by_segment(chunks)
    assert len(groups) == 10
    prompts = [g[-1].usage.prompt_tokens for g in groups if g[-1].usage is not None]
    # At most two previous segments (each about 50 + 8 tokens) besides the instruction.
    assert max(prompts) < prompts[0] + 2 * 70
    none = list(client.translate_live(SEGMENTS[:3], target="de", max_tokens=4, context_segments=0))
    sizes = {g[-1].usage.prompt_tokens for g in _by_segment(none) if g[-1].usage is not None}
    assert max(sizes) - min(sizes) <= 2  # each segment alone


def test_pieces_join_until_final_and_half_close_flushes(client: Client) -> None:
    pieces = [("Sentence number 0 of the talk, ", False), ("about trains.", True), ("Open", False)]
    joined = _by_segment(
        list(client.translate_live(pieces, target="de", max_tokens=12, temperature=0))
    )
    whole = _by_segment(
        list(
            client.translate_live(
                [SEGMENTS[0], "Open"], target="de", max_tokens=12, temperature=0.0
            )
        )
    )
    assert [_text(g) for g in joined] == [_text(g) for g in whole]
    assert len(joined) == 2


def test_async_client_takes_an_async_iterable(stack: Stack) -> None:
    async def segments():  # type: ignore[no-untyped-def]
        for segment in SEGMENTS[:3]:
            await asyncio.sleep(0.01)
            yield segment

    async def run() -> list[SegmentChunk]:
        async with AsyncClient(stack.gateway, timeout=60) as c:
            stream = c.translate_live(segments(), source="en", target="fr", max_tokens=6)
            return [chunk async for chunk in stream]

    assert len(_by_segment(asyncio.run(run()))) == 3


def test_cancel_mid_stream_frees_the_kv(stack: Stack, client: Client) -> None:
    baseline = idle_free_blocks(stack.replica)
    feed: queue.Queue[str | None] = queue.Queue()
    feed.put(SEGMENTS[0])

    def segments() -> Iterator[str]:
        while (item := feed.get()) is not None:
            yield item

    stream = client.translate_live(segments(), target="de", max_tokens=900, ignore_eos=True)
    for _ in range(3):
        assert next(stream).segment_index == 0
    assert idle_free_blocks_now(stack) < baseline
    stream.close()  # cancels the call
    feed.put(None)
    wait_free_blocks(stack.replica, baseline)


def idle_free_blocks_now(stack: Stack) -> int:
    from tests.fixtures.servers import shard_status

    return shard_status(stack.replica).kv_blocks_free


def _live_error(stack: Stack, requests: list[inference_pb2.TranslateLiveRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.TranslateLive(iter(requests), timeout=30))
    return info.value


def _config(**fields: object) -> inference_pb2.TranslateLiveRequest:
    fields.setdefault("target_lang", "de")
    fields.setdefault("sampling", inference_pb2.SamplingParams(max_tokens=4))
    return inference_pb2.TranslateLiveRequest(config=inference_pb2.TranslateLiveConfig(**fields))


def _segment(text: str, final: bool = True) -> inference_pb2.TranslateLiveRequest:
    return inference_pb2.TranslateLiveRequest(
        segment=inference_pb2.TranslateSegment(text=text, final=final)
    )


BAD_STREAMS = {
    "segment first": ([_segment("hi")], "INVALID_ARGUMENT", "must carry config"),
    "no messages": ([], "INVALID_ARGUMENT", "must carry config"),
    "config twice": ([_config(), _config()], "INVALID_ARGUMENT", "only the first"),
    "bad target": ([_config(target_lang="xx")], "INVALID_ARGUMENT", "config.target_lang"),
    "bad source": ([_config(source_lang="qq")], "INVALID_ARGUMENT", "config.source_lang"),
    "context too large": (
        [_config(context_segments=17)],
        "INVALID_ARGUMENT",
        "config.context_segments must be at most 16",
    ),
    "bad sampling": (
        [_config(sampling=inference_pb2.SamplingParams(top_p=2.0))],
        "INVALID_ARGUMENT",
        "sampling.top_p",
    ),
    "unknown model": ([_config(model="gpt-17")], "NOT_FOUND", "gpt-17"),
    "empty segment": ([_config(), _segment("")], "INVALID_ARGUMENT", "must not be empty"),
    "segment too large": (
        [_config(), _segment("x" * 200, final=False), _segment("y" * 101)],
        "RESOURCE_EXHAUSTED",
        "segment.text of segment 0 is 301 bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_streams_get_a_clear_status(stack: Stack, case: str) -> None:
    requests, code, fragment = BAD_STREAMS[case]
    error = _live_error(stack, requests)
    assert error.code().name == code, error.details()  # type: ignore[attr-defined]
    assert fragment in error.details()  # type: ignore[attr-defined]


def test_too_many_segments_in_flight_is_refused_and_frees_the_kv(stack: Stack) -> None:
    baseline = idle_free_blocks(stack.replica)
    sampling = inference_pb2.SamplingParams(max_tokens=900, ignore_eos=True)
    requests = [_config(sampling=sampling), *(_segment(s) for s in SEGMENTS[:6])]
    error = _live_error(stack, requests)
    code, details = error.code(), error.details()  # type: ignore[attr-defined]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "segment 4 arrived with 4 segments not yet translated" in details, details
    wait_free_blocks(stack.replica, baseline)


def test_streams_run_side_by_side(stack: Stack) -> None:
    results: dict[int, int] = {}

    def run(k: int) -> None:
        with Client(stack.gateway, timeout=60) as c:
            chunks = list(c.translate_live(SEGMENTS[:4], target="es", max_tokens=6, seed=k))
            results[k] = len(_by_segment(chunks))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {0: 4, 1: 4, 2: 4}


def _then_silent(
    messages: list[inference_pb2.TranslateLiveRequest], release: threading.Event
) -> Iterator[inference_pb2.TranslateLiveRequest]:
    yield from messages
    release.wait(30)


def test_silent_streams_end_and_give_their_slot_back() -> None:
    """A stream that sends no config, or stays silent between segments, ends with
    DEADLINE_EXCEEDED instead of holding one of the gateway's stream slots."""
    live = LiveTranslateConfig(config_timeout_s=0.5, idle_timeout_s=1.0)
    for s in servers():
        gateway = s.gateway([s.shard()], live=live, max_concurrent_streams=1)
        release = threading.Event()
        with grpc.insecure_channel(gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for sent, what in (([], "config within 0.5 s"), ([_config(), _segment("Hi.")],
                                                            "message within 1 s")):  # fmt: skip
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.TranslateLive(_then_silent(sent, release), timeout=30))
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert f"no TranslateLive {what}" in info.value.details()
            release.set()
        # The one stream slot is free again.
        with Client(gateway, timeout=30) as c:
            chunks = list(c.chat([{"role": "user", "content": "hi"}], max_tokens=2))
        assert sum(len(chunk.token_ids) for chunk in chunks) == 2


def test_a_stream_waiting_for_its_translations_is_not_idle() -> None:
    """The idle clock does not run while a segment the client sent is still being
    translated: the translation, longer than the idle timeout, arrives whole."""
    live = LiveTranslateConfig(config_timeout_s=5.0, idle_timeout_s=0.5)
    for s in servers():
        gateway = s.gateway([s.shard()], live=live)
        release = threading.Event()
        sampling = inference_pb2.SamplingParams(max_tokens=600, ignore_eos=True)
        sent = [_config(sampling=sampling), _segment("A long talk.")]
        tokens = 0
        with grpc.insecure_channel(gateway) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                for response in stub.TranslateLive(_then_silent(sent, release), timeout=60):
                    tokens += len(response.chunk.token_ids)
            release.set()
        assert tokens == 600, "the translation was cut off"
        assert time.monotonic() - started > 0.5  # it outlasted the idle timeout
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
