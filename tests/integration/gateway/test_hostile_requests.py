"""Hostile requests to an in-process gateway and replica leader: bytes that are not
a message, client text echoed in errors, oversized messages, and Shard calls that
skip the gateway's checks. Each is refused with a precise status and a short
message; the servers keep serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from shardwire.v1 import inference_pb2, inference_pb2_grpc, shard_pb2, shard_pb2_grpc

from tests.fixtures.servers import servers


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[str, str]]:
    for s in servers():
        shard = s.shard()
        yield shard, s.gateway([shard])


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(call)  # type: ignore[call-overload]
    return info.value


def test_bytes_that_are_not_a_message(deployment: tuple[str, str]) -> None:
    """Pass: corrupt request bytes on a unary-request and a streaming-request method
    give INVALID_ARGUMENT naming the parse failure (not UNKNOWN or INTERNAL)."""
    _, gateway = deployment
    with grpc.insecure_channel(gateway) as channel:
        generate = channel.unary_stream("/shardwire.v1.Inference/Generate")
        error = refused(generate(b"\x12\x80", timeout=10))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "does not parse" in (error.details() or "")
        live = channel.stream_stream("/shardwire.v1.Inference/TranslateLive")
        error = refused(live(iter([b"\xff\xff\xff"]), timeout=10))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_echoed_text_is_clipped(deployment: tuple[str, str]) -> None:
    """Pass: a 100 000-character role, model name, session id or language code is
    refused with INVALID_ARGUMENT or NOT_FOUND whose message is under 512 characters
    (unclipped, the client would get RESOURCE_EXHAUSTED "Stream removed")."""
    _, gateway = deployment
    huge = "x" * 100_000
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        message = inference_pb2.ChatMessage(role=huge, content="hi")
        calls = [
            stub.Chat(inference_pb2.ChatRequest(messages=[message]), timeout=10),
            stub.Generate(inference_pb2.GenerateRequest(model=huge, prompt="hi"), timeout=10),
            stub.Chat(
                inference_pb2.ChatRequest(
                    messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                    session_id=huge,
                    append_only=True,
                ),
                timeout=10,
            ),
            stub.Translate(inference_pb2.TranslateRequest(text="hi", target_lang=huge), timeout=10),
        ]
        for call in calls:
            error = refused(call)
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert len(error.details() or "") < 512


def test_a_message_over_the_receive_limit(deployment: tuple[str, str]) -> None:
    """Pass: an uncompressed 2 MiB request (limit 1 MiB) gets RESOURCE_EXHAUSTED and
    the next request succeeds."""
    _, gateway = deployment
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        big = inference_pb2.GenerateRequest(prompt="a" * (2 << 20))
        assert refused(stub.Generate(big, timeout=10)).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = inference_pb2.GenerateRequest(prompt="hi", sampling={"max_tokens": 2})
        assert list(stub.Generate(ok, timeout=10))[-1].finish_reason


@pytest.mark.parametrize(
    ("request_fields", "pattern"),
    [
        ({"request_id": "r" * 1000}, "request_id is longer"),
        ({"stop_token_ids": [10**9]}, "stop_token_ids must be in"),
        ({"stop_token_ids": list(range(300))}, "at most 256"),
        ({"sampling": {"temperature": float("inf")}}, "temperature"),
        ({"sampling": {"top_p": float("nan")}}, "top_p"),
        ({"prompt_token_ids": [1] * 5000}, "the context holds"),
        ({"prompt_token_ids": [10**9]}, "outside the vocabulary"),
    ],
)
def test_shard_checks_what_skips_the_gateway(
    deployment: tuple[str, str], request_fields: dict, pattern: str
) -> None:
    """Pass: a Shard.Generate call with a bad field gets INVALID_ARGUMENT naming it."""
    shard, _ = deployment
    fields = {"prompt_token_ids": [1, 2, 3], **request_fields}
    with grpc.insecure_channel(shard) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        error = refused(stub.Generate(shard_pb2.ShardGenerateRequest(**fields), timeout=10))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert pattern in (error.details() or ""), error.details()


def test_servers_still_serve(deployment: tuple[str, str]) -> None:
    _, gateway = deployment
    with grpc.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        ok = inference_pb2.GenerateRequest(prompt="hi", sampling={"max_tokens": 2})
        assert list(stub.Generate(ok, timeout=10))[-1].finish_reason
