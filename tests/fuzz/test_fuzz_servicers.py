"""Fuzzing the servicers over real gRPC: requests with arbitrary field values sent
to an in-process gateway and replica leader (tiny model), and arbitrary bytes sent
as a gateway request message. Each test runs for its share of FUZZ_SECONDS.

Pass criterion: every call ends with OK (its stream finished with a finish
reason) or with a status that names a client error (INVALID_ARGUMENT, NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION; bytes that are not a message are
INVALID_ARGUMENT too) and a short, readable message, never INTERNAL or UNKNOWN;
no call takes 5 s; afterwards a plain request still succeeds and the replica's KV
blocks are all free again."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from shardwire.v1 import inference_pb2, inference_pb2_grpc, shard_pb2, shard_pb2_grpc

from tests.fixtures.servers import Servers, idle_free_blocks, servers, shard_status
from tests.fuzz.budget import FUZZ, run_for, timeout_s

CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
CALL_TIMEOUT_S = 5.0
MAX_DETAILS_CHARS = 512
# A stream with arbitrary input cannot run long: few tokens allowed.
MAX_TOKENS_LIMIT = 6

TEXT = st.text(max_size=30) | st.text(min_size=200, max_size=3000)
SMALL_TEXT = st.text(max_size=12)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


def mostly(plausible: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Three times in four a plausible value, so that requests get past the first
    check often enough to reach the later ones."""
    return st.one_of(plausible, plausible, plausible, wild)


LANGS = mostly(st.sampled_from(["en", "de", "fr", "auto", "", "EN", " de "]), SMALL_TEXT | TEXT)
MODELS = mostly(st.sampled_from(["", "tiny"]), SMALL_TEXT | TEXT)
IDS = mostly(
    st.lists(st.integers(0, 263), min_size=1, max_size=40),
    st.lists(st.integers(0, 300) | st.integers(0, 2**32 - 1), max_size=3000),
)


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[Servers, str, str]]:
    for s in servers():
        shard = s.shard()
        gateway = s.gateway(
            [shard],
            max_tokens_limit=MAX_TOKENS_LIMIT,
            default_max_tokens=4,
            max_request_bytes=1 << 16,
        )
        yield s, shard, gateway


def sampling() -> st.SearchStrategy[inference_pb2.SamplingParams]:
    @st.composite
    def build(draw: st.DrawFn) -> inference_pb2.SamplingParams:
        msg = inference_pb2.SamplingParams(
            top_k=draw(mostly(st.sampled_from([0, 1, 5]), st.integers(0, 2**32 - 1))),
            stop=draw(
                mostly(
                    st.lists(st.text(min_size=1, max_size=4), max_size=2),
                    st.lists(SMALL_TEXT | TEXT, max_size=20),
                )
            ),
            ignore_eos=draw(st.booleans()),
        )
        if draw(st.booleans()):
            msg.max_tokens = draw(mostly(st.integers(1, 6), st.integers(0, 2**32 - 1)))
        if draw(st.booleans()):
            msg.temperature = draw(mostly(st.sampled_from([0.0, 0.7, 1.0]), FLOATS))
        if draw(st.booleans()):
            msg.top_p = draw(mostly(st.sampled_from([0.5, 1.0]), FLOATS))
        if draw(st.booleans()):
            msg.seed = draw(st.integers(0, 2**64 - 1))
        return msg

    return build()


def chat_requests() -> st.SearchStrategy[inference_pb2.ChatRequest]:
    roles = mostly(st.sampled_from(["user", "assistant", "system"]), SMALL_TEXT | TEXT)
    message = st.builds(inference_pb2.ChatMessage, role=roles, content=SMALL_TEXT | TEXT)
    return st.builds(
        inference_pb2.ChatRequest,
        model=MODELS,
        messages=mostly(
            st.lists(message, min_size=1, max_size=6),
            st.lists(message, max_size=12) | st.lists(message, min_size=100, max_size=400),
        ),
        sampling=sampling(),
        session_id=mostly(st.sampled_from(["", "0" * 32]), SMALL_TEXT | TEXT),
        request_id=SMALL_TEXT | TEXT,
        append_only=st.booleans(),
    )


def translate_requests() -> st.SearchStrategy[inference_pb2.TranslateRequest]:
    return st.builds(
        inference_pb2.TranslateRequest,
        model=MODELS,
        text=SMALL_TEXT | TEXT,
        source_lang=LANGS,
        target_lang=LANGS,
        sampling=sampling(),
        request_id=SMALL_TEXT,
    )


def generate_requests() -> st.SearchStrategy[inference_pb2.GenerateRequest]:
    return st.builds(
        inference_pb2.GenerateRequest,
        model=MODELS,
        prompt=st.just("") | SMALL_TEXT | TEXT,
        prompt_token_ids=st.just([]) | IDS,
        sampling=sampling(),
        request_id=SMALL_TEXT | TEXT,
    )


def check_outcome(call_chunks: Iterator, allowed: set[grpc.StatusCode] = CLIENT_ERRORS) -> None:
    """Consumes a stream: OK ends with a finish reason, an error is a client error."""
    try:
        chunks = list(call_chunks)
    except grpc.RpcError as error:
        details = error.details() or ""
        assert error.code() in allowed, (error.code(), details[:300])
        assert details and len(details) <= MAX_DETAILS_CHARS, details[:300]
        assert not details.startswith("Stream removed"), details[:300]
        return
    assert chunks, "a stream ended without a chunk"
    last = chunks[-1]
    finish = last.chunk.finish_reason if hasattr(last, "chunk") else last.finish_reason
    assert finish != 0, "a stream ended without a finish reason"


def plain_request_works(gateway: str) -> None:
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(
            prompt="hello", sampling=inference_pb2.SamplingParams(max_tokens=3)
        )
        chunks = list(stub.Generate(request, timeout=30))
        assert chunks[-1].finish_reason != 0


@pytest.mark.timeout(timeout_s("gateway_requests"))
def test_gateway_requests(deployment: tuple[Servers, str, str]) -> None:
    """Chat, Translate, Generate and CloseSession with arbitrary fields."""
    _, shard, gateway = deployment
    total = shard_status(shard).kv_blocks_total
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        @FUZZ
        @given(
            request=chat_requests() | translate_requests() | generate_requests(),
            close=st.none() | SMALL_TEXT | TEXT,
        )
        def search(request, close) -> None:
            method = {
                inference_pb2.ChatRequest: stub.Chat,
                inference_pb2.TranslateRequest: stub.Translate,
                inference_pb2.GenerateRequest: stub.Generate,
            }[type(request)]
            check_outcome(method(request, timeout=CALL_TIMEOUT_S))
            if close is not None:
                try:
                    stub.CloseSession(
                        inference_pb2.CloseSessionRequest(session_id=close), timeout=CALL_TIMEOUT_S
                    )
                except grpc.RpcError as error:
                    assert error.code() in CLIENT_ERRORS, error.details()

        run_for("gateway_requests", search)
    plain_request_works(gateway)
    assert idle_free_blocks(shard) == total


@pytest.mark.timeout(timeout_s("gateway_raw_bytes"))
def test_gateway_raw_request_bytes(deployment: tuple[Servers, str, str]) -> None:
    """Arbitrary bytes (and valid messages with bytes changed) as the request message
    of every streaming method, TranslateLive included."""
    _, shard, gateway = deployment
    valid = [
        inference_pb2.GenerateRequest(prompt="hi", sampling={"max_tokens": 2}).SerializeToString(),
        inference_pb2.ChatRequest(
            messages=[inference_pb2.ChatMessage(role="user", content="hey")]
        ).SerializeToString(),
        inference_pb2.TranslateRequest(text="x", target_lang="de").SerializeToString(),
    ]
    with grpc.insecure_channel(gateway) as channel:
        calls = [
            channel.unary_stream(
                f"/shardwire.v1.Inference/{name}",
                response_deserializer=inference_pb2.GenerateChunk.FromString,
            )
            for name in ("Generate", "Chat", "Translate")
        ]
        live = channel.stream_stream(
            "/shardwire.v1.Inference/TranslateLive",
            response_deserializer=inference_pb2.TranslateLiveResponse.FromString,
        )

        @FUZZ
        @given(
            method=st.integers(0, 2),
            data=st.binary(max_size=300) | st.sampled_from(valid),
            edits=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
            live_messages=st.lists(st.binary(max_size=60), max_size=3),
        )
        def search(method: int, data: bytes, edits, live_messages) -> None:
            mutated = bytearray(data)
            for pos, value in edits:
                if mutated:
                    mutated[pos % len(mutated)] = value
            check_outcome(calls[method](bytes(mutated), timeout=CALL_TIMEOUT_S))
            check_outcome(live(iter(live_messages), timeout=CALL_TIMEOUT_S))

        run_for("gateway_raw_bytes", search)
    plain_request_works(gateway)
    assert idle_free_blocks(shard) == shard_status(shard).kv_blocks_total


@pytest.mark.timeout(timeout_s("shard_requests"))
def test_shard_requests(deployment: tuple[Servers, str, str]) -> None:
    """Shard.Generate called directly (a caller that skips the gateway's checks)."""
    _, shard, gateway = deployment
    total = shard_status(shard).kv_blocks_total
    with grpc.insecure_channel(shard) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)

        @FUZZ
        @given(
            request_id=mostly(st.just(""), SMALL_TEXT | TEXT),
            prompt=IDS,
            sampling=sampling(),
            stop_ids=mostly(
                st.lists(st.integers(0, 263), max_size=3),
                st.lists(st.integers(0, 2**32 - 1), max_size=300),
            ),
        )
        def search(request_id, prompt, sampling, stop_ids) -> None:
            if sampling.max_tokens > MAX_TOKENS_LIMIT:
                sampling.max_tokens = MAX_TOKENS_LIMIT  # keep accepted streams short
            request = shard_pb2.ShardGenerateRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                stop_token_ids=stop_ids,
            )
            check_outcome(stub.Generate(request, timeout=CALL_TIMEOUT_S))

        run_for("shard_requests", search)
    plain_request_works(gateway)
    assert idle_free_blocks(shard) == total
