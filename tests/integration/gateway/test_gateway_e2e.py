"""Gateway + replica in-process on the built-in tiny model, driven through the SDK.

Both servers run on one event loop in a background thread for the whole
module; the tests talk to them over gRPC like any client would.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from clients.cli import build_parser, chat_repl
from clients.client import AsyncClient, Chunk, Client, sampling_params
from serve.config import GatewayConfig, ShardConfig
from serve.errors import Unavailable
from serve.gateway.app import start_gateway
from serve.model.tokenizer import Tokenizer
from serve.shard.app import start_shard
from tests.fixtures.servers import idle_free_blocks, shard_status, wait_free_blocks

MAX_TOKENS_LIMIT = 1000
MAX_REQUEST_BYTES = 64 * 1024
CONTEXT = 2048  # the tiny preset's context length
BUILTIN = Tokenizer.builtin()
GOOD_PROMPT = "The concurrent request"
GOOD_TOKENS = 48


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    gateway: str
    shard: str

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="e2e-servers", daemon=True)
    thread.start()

    async def start() -> tuple[Any, Any]:
        shard = await start_shard(ShardConfig(port=0))
        config = GatewayConfig(
            port=0,
            replicas=(f"127.0.0.1:{shard.port}",),
            max_tokens_limit=MAX_TOKENS_LIMIT,
            max_request_bytes=MAX_REQUEST_BYTES,
            status_poll_interval_s=0.2,
            startup_timeout_s=30.0,
        )
        return shard, await start_gateway(config)

    shard, gateway = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    yield Stack(loop, f"127.0.0.1:{gateway.port}", f"127.0.0.1:{shard.port}")

    async def stop() -> None:
        await gateway.stop(0.5)
        await shard.stop(0.5)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.gateway, timeout=30) as c:
        yield c


def _idle_free_blocks(stack: Stack, timeout_s: float = 10.0) -> int:
    return idle_free_blocks(stack.shard, timeout_s)


def _wait_free_blocks(stack: Stack, expected: int, timeout_s: float = 10.0) -> None:
    wait_free_blocks(stack.shard, expected, timeout_s)


def _health(stack: Stack, service: str = "shardwire.v1.Inference") -> int:
    with grpc.insecure_channel(stack.gateway) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def _check_stream(chunks: list[Chunk]) -> Chunk:
    """The invariants of every finished stream; returns its last chunk."""
    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    ids = [i for c in chunks for i in c.token_ids]
    assert last.usage is not None and last.timing is not None
    assert last.usage.completion_tokens == len(ids) > 0
    assert last.usage.prompt_tokens > 0
    assert 0 < last.timing.time_to_first_token_s <= last.timing.total_s
    assert last.timing.queue_s >= 0
    assert "".join(c.text for c in chunks) == BUILTIN.decode(ids)
    return last


@pytest.fixture(scope="module")
def good_reference(stack: Stack) -> tuple[int, ...]:
    """Greedy token ids of the request that runs beside each bad one."""
    with Client(stack.gateway, timeout=30) as c:
        chunks = list(
            c.generate(GOOD_PROMPT, max_tokens=GOOD_TOKENS, temperature=0.0, ignore_eos=True)
        )
    return tuple(i for chunk in chunks for i in chunk.token_ids)


# -- streaming ------------------------------------------------------------------------


def test_chat_streams_text_with_usage_and_timing(client: Client) -> None:
    chunks = list(client.chat("Hello there!", max_tokens=40, seed=3))
    assert len(chunks) > 1
    last = _check_stream(chunks)
    prompt = BUILTIN.encode_chat([{"role": "user", "content": "Hello there!"}])
    assert last.usage is not None and last.usage.prompt_tokens == len(prompt)
    if last.finish_reason == "length":
        assert last.usage.completion_tokens == 40


def test_translate_streams_text_with_usage_and_timing(client: Client) -> None:
    chunks = list(client.translate("Guten Morgen", source="de", target="en", max_tokens=30))
    last = _check_stream(chunks)
    instruction = (
        "Translate the following text from German to English. "
        "Reply with the translation only.\n\nGuten Morgen"
    )
    prompt = BUILTIN.encode_chat([{"role": "user", "content": instruction}])
    assert last.usage is not None and last.usage.prompt_tokens == len(prompt)


def test_generate_from_token_ids_and_max_tokens_gives_length(client: Client) -> None:
    chunks = list(client.generate([257, *b"abc"], max_tokens=25, ignore_eos=True))
    last = _check_stream(chunks)
    assert last.finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 25


def test_seeded_requests_repeat(client: Client) -> None:
    def run() -> tuple[int, ...]:
        chunks = client.generate("seeded", max_tokens=20, temperature=0.9, seed=11)
        return tuple(i for c in chunks for i in c.token_ids)

    assert run() == run()


def test_second_dialogue_turn_hits_the_prefix_cache(client: Client) -> None:
    turn = [{"role": "user", "content": "Tell me something long enough to fill blocks. " * 3}]
    first = list(client.chat(turn, max_tokens=8, temperature=0.0))
    answer = "".join(c.text for c in first)
    turn += [{"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
    last = list(client.chat(turn, max_tokens=8, temperature=0.0))[-1]
    assert last.usage is not None and last.usage.cached_prompt_tokens > 0


def test_async_client_streams(stack: Stack) -> None:
    async def run() -> list[Chunk]:
        async with AsyncClient(stack.gateway, timeout=30) as c:
            models = await c.list_models()
            assert [m.id for m in models] == ["tiny"]
            return [chunk async for chunk in c.chat("hi", max_tokens=10)]

    _check_stream(asyncio.run(run()))


def test_chat_repl_keeps_the_conversation(client: Client) -> None:
    args = build_parser().parse_args(["chat", "--max-tokens", "6", "--temperature", "0"])
    out = io.StringIO()
    history = chat_repl(client, args, io.StringIO("hello\n\nand again\n/exit\nignored\n"), out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "and again"
    assert out.getvalue().count("\n") == 2


# -- stop strings, cancel, deadline ---------------------------------------------------


def test_stop_string_cuts_output_and_frees_kv(stack: Stack, client: Client) -> None:
    sampling = {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    full_chunks = list(client.generate("stop strings", **sampling))
    full = "".join(c.text for c in full_chunks)
    # A stop string taken from the middle of the greedy output, free of U+FFFD.
    start = next(
        i for i in range(10, len(full) - 3) if "\ufffd" not in full[i : i + 3] and full[i : i + 3]
    )
    stop = full[start : start + 3]
    baseline = _idle_free_blocks(stack)
    chunks = list(client.generate("stop strings", stop=[stop, "never-matches"], **sampling))
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert "".join(c.text for c in chunks) == full[: full.find(stop)]
    assert last.usage is not None and last.usage.completion_tokens < 200
    _wait_free_blocks(stack, baseline)


def test_client_cancel_returns_kv_blocks(stack: Stack, client: Client) -> None:
    baseline = _idle_free_blocks(stack)
    stream = client.generate("cancel me", max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True)
    for _ in range(3):
        assert next(stream).finish_reason is None
    assert shard_status(stack.shard).kv_blocks_free < baseline
    stream.close()  # cancels the call
    _wait_free_blocks(stack, baseline)
    assert shard_status(stack.shard).num_running == 0


def test_deadline_reaches_the_replica(stack: Stack) -> None:
    baseline = _idle_free_blocks(stack)
    with Client(stack.gateway, timeout=0.5) as short, pytest.raises(grpc.RpcError) as info:
        for _ in short.generate("slow", max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_free_blocks(stack, baseline)


# -- bad input ------------------------------------------------------------------------

Call = Callable[[inference_pb2_grpc.InferenceStub], Any]


def _chat(messages: list[tuple[str, str]], **sampling: Any) -> Call:
    request = inference_pb2.ChatRequest(
        messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages],
        sampling=sampling_params(**sampling),
    )
    return lambda stub: list(stub.Chat(request, timeout=10))


def _generate(**fields: Any) -> Call:
    sampling = sampling_params(**fields.pop("sampling", {}))
    request = inference_pb2.GenerateRequest(sampling=sampling, **fields)
    return lambda stub: list(stub.Generate(request, timeout=10))


def _translate(text: str, source: str, target: str) -> Call:
    request = inference_pb2.TranslateRequest(text=text, source_lang=source, target_lang=target)
    return lambda stub: list(stub.Translate(request, timeout=10))


HI = [("user", "hi")]
BAD_INPUTS: dict[str, tuple[Call, grpc.StatusCode, str]] = {
    "empty messages": (_chat([]), grpc.StatusCode.INVALID_ARGUMENT, "messages must not be empty"),
    "unknown role": (
        _chat([("user", "a"), ("assistant", "b"), ("robot", "c")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[2].role",
    ),
    "max_tokens 0": (
        _chat(HI, max_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.max_tokens",
    ),
    "max_tokens above the limit": (
        _chat(HI, max_tokens=MAX_TOKENS_LIMIT + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"sampling.max_tokens must be in [1, {MAX_TOKENS_LIMIT}]",
    ),
    "negative temperature": (
        _chat(HI, temperature=-0.1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    "top_p zero": (_chat(HI, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    "top_p above one": (
        _chat(HI, top_p=1.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p must be in (0, 1], got 1.5",
    ),
    "prompt longer than the context (ids)": (
        _generate(prompt_token_ids=[65] * CONTEXT),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt_token_ids is too long",
    ),
    "prompt longer than the context (chat)": (
        _chat([("user", "x" * CONTEXT)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages is too long",
    ),
    "token ids outside the vocabulary": (
        _generate(prompt_token_ids=[65, 264]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt_token_ids[1] = 264",
    ),
    "prompt and token ids": (
        _generate(prompt="a", prompt_token_ids=[65]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt_token_ids",
    ),
    "unknown target language": (
        _translate("hello", "en", "xx"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "target_lang",
    ),
    "unknown source language": (
        _translate("hello", "qq", "de"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "source_lang",
    ),
    "empty translation text": (
        _translate("", "en", "de"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "text must not be empty",
    ),
    "unknown model": (
        _generate(model="gpt-17", prompt="hi"),
        grpc.StatusCode.NOT_FOUND,
        "gpt-17",
    ),
    "request too large": (
        _generate(prompt="a" * (MAX_REQUEST_BYTES + 1000)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_others_carry_on(
    case: str, stack: Stack, client: Client, good_reference: tuple[int, ...]
) -> None:
    call, code, fragment = BAD_INPUTS[case]
    good = client.generate(GOOD_PROMPT, max_tokens=GOOD_TOKENS, temperature=0.0, ignore_eos=True)
    first = next(good)  # the good request is running on the replica now
    with grpc.insecure_channel(stack.gateway) as channel, pytest.raises(grpc.RpcError) as info:
        call(inference_pb2_grpc.InferenceStub(channel))
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    assert _health(stack) == health_pb2.HealthCheckResponse.SERVING
    chunks = [first, *good]
    assert _check_stream(chunks).finish_reason == "length"
    assert tuple(i for c in chunks for i in c.token_ids) == good_reference


# -- service plumbing -----------------------------------------------------------------


def test_health_and_reflection(stack: Stack) -> None:
    assert _health(stack, "") == health_pb2.HealthCheckResponse.SERVING
    assert _health(stack) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in response.list_services_response.service}
    assert {"shardwire.v1.Inference", "grpc.health.v1.Health"} <= names


def test_list_models(client: Client) -> None:
    (model,) = client.list_models()
    assert (model.id, model.max_context, model.vocab_size) == ("tiny", CONTEXT, 264)
    assert model.num_replicas == 1 and model.tp_size == 1 and model.dtype == "float32"


def test_gateway_start_gives_up_without_replicas() -> None:
    config = GatewayConfig(port=0, replicas=("127.0.0.1:1",), startup_timeout_s=0.5)

    async def start() -> None:
        await start_gateway(config)

    began = time.monotonic()
    with pytest.raises(Unavailable, match="no replica answered"):
        asyncio.run(start())
    assert time.monotonic() - began < 10


def test_health_follows_the_replica() -> None:
    """When the only replica goes away the gateway turns NOT_SERVING and refuses
    requests with UNAVAILABLE."""

    async def run() -> None:
        shard = await start_shard(ShardConfig(port=0))
        config = GatewayConfig(
            port=0, replicas=(f"127.0.0.1:{shard.port}",), status_poll_interval_s=0.1
        )
        gateway = await start_gateway(config)
        target = f"127.0.0.1:{gateway.port}"
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="shardwire.v1.Inference")
                assert (
                    await health.Check(request)
                ).status == health_pb2.HealthCheckResponse.SERVING
                await shard.stop(0)
                deadline = time.monotonic() + 10
                while (
                    await health.Check(request)
                ).status == health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                stub = inference_pb2_grpc.InferenceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.Generate(inference_pb2.GenerateRequest(prompt="hi")):
                        pass
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await gateway.stop(0)

    asyncio.run(run())
