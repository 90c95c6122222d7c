"""Shard.ImportKv against hostile streams, on a real replica (tiny model): each
is refused with a clear status code, the replica keeps serving and every KV block
it staged is freed; a stream that ends before the KV of every layer came is
refused, not cached half written. A message past gRPC's default 4 MiB still reaches the checks
(KV chunks of wide models are that large); one past MAX_MESSAGE_BYTES does not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from shardwire.v1 import inference_pb2, shard_pb2, shard_pb2_grpc

from serve.comm.kv_codecs import KvCodec, encode_kv
from serve.shard.kv_transfer import MAX_MESSAGE_BYTES
from tests.fixtures.servers import Servers, idle_free_blocks, servers, shard_status

Messages = list[shard_pb2.KvChunk]


@pytest.fixture(scope="module")
def replica() -> Iterator[tuple[Servers, str, shard_pb2.StatusResponse]]:
    for s in servers():
        address = s.shard()
        yield s, address, shard_status(address)


def _header(status: shard_pb2.StatusResponse, end_token: int = 32, **fields) -> shard_pb2.KvChunk:
    fields.setdefault("geometry", status.kv_geometry)
    header = shard_pb2.KvHeader(
        request_id=fields.pop("request_id", "hostile"),
        codec=fields.pop("codec", "none"),
        end_token=end_token,
        prefix=True,
        state=shard_pb2.RequestState(prompt_token_ids=list(range(1, end_token + 1))),
        **fields,
    )
    return shard_pb2.KvChunk(header=header)


def _request_header(
    status: shard_pb2.StatusResponse, outputs: list[int], commit: bool = False, rid: str = "moved"
) -> shard_pb2.KvChunk:
    """A header of a running request (a migration's): a 32-token prompt and `outputs`."""
    state = shard_pb2.RequestState(
        request_id=rid,
        prompt_token_ids=list(range(1, 33)),
        output_token_ids=outputs,
        sampling=inference_pb2.SamplingParams(max_tokens=64, temperature=0.0),
    )
    header = shard_pb2.KvHeader(
        request_id=rid, geometry=status.kv_geometry, codec="none", end_token=32,
        state=state, commit=commit,
    )  # fmt: skip
    return shard_pb2.KvChunk(header=header)


def _moved_request(
    status: shard_pb2.StatusResponse, first: list[int], later: list[int]
) -> Messages:
    """A request's KV, then a committing header whose state differs from the first."""
    layers = status.kv_geometry.num_layers
    return [
        _request_header(status, first),
        *(_chunk(status, layer, 0, 32) for layer in range(layers)),
        _request_header(status, later, commit=True),
    ]


def _chunk(status: shard_pb2.StatusResponse, layer: int, start: int, n: int) -> shard_pb2.KvChunk:
    g = status.kv_geometry
    k = torch.randn(n, g.num_kv_heads, g.head_dim, dtype=getattr(torch, g.dtype))
    kf, vf = encode_kv(k, k, KvCodec.parse("none"))
    return shard_pb2.KvChunk(
        layer=layer, start_token=start, num_tokens=n, key_frame=kf, value_frame=vf
    )


def _import(address: str, messages: Messages) -> grpc.RpcError | shard_pb2.ImportKvResponse:
    with grpc.insecure_channel(address) as channel:
        try:
            return shard_pb2_grpc.ShardStub(channel).ImportKv(iter(messages), timeout=30)
        except grpc.RpcError as err:
            return err


def _other_geometry(status: shard_pb2.StatusResponse) -> shard_pb2.KvGeometry:
    g = shard_pb2.KvGeometry()
    g.CopyFrom(status.kv_geometry)
    g.num_kv_heads += 1
    return g


def _relabel(chunk: shard_pb2.KvChunk, **fields: int) -> shard_pb2.KvChunk:
    for name, value in fields.items():
        setattr(chunk, name, value)
    return chunk


def _corrupt(chunk: shard_pb2.KvChunk) -> shard_pb2.KvChunk:
    frame = bytearray(chunk.key_frame)
    frame[-1] ^= 0xFF
    chunk.key_frame = bytes(frame)
    return chunk


HOSTILE: dict[str, tuple[Callable[[shard_pb2.StatusResponse], Messages], grpc.StatusCode, str]] = {
    "no header": (
        lambda st: [_chunk(st, 0, 0, 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "starts with a header",
    ),
    "layer past the model": (
        lambda st: [_header(st), _chunk(st, st.kv_geometry.num_layers, 0, 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk of layer",
    ),
    "tokens past the announced end": (
        lambda st: [_header(st), _chunk(st, 0, 24, 16)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "outside the announced",
    ),
    "another model's geometry": (
        lambda st: [_header(st, geometry=_other_geometry(st)), _chunk(st, 0, 0, 16)],
        grpc.StatusCode.FAILED_PRECONDITION,
        "does not fit this model",
    ),
    "corrupt frame": (
        lambda st: [_header(st), _corrupt(_chunk(st, 0, 0, 16))],
        grpc.StatusCode.INVALID_ARGUMENT,
        "checksum",
    ),
    "frames of more tokens than the chunk says": (
        lambda st: [_header(st), _relabel(_chunk(st, 0, 0, 16), num_tokens=8)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "",
    ),
    "stream ending before every layer's KV came": (
        lambda st: [
            _header(st),
            *(_chunk(st, layer, 0, 32) for layer in range(st.kv_geometry.num_layers - 1)),
            _chunk(st, st.kv_geometry.num_layers - 1, 0, 16),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "tokens 16..32 of layer 3 missing",
    ),
    "tokens skipped": (
        lambda st: [
            _header(st),
            *(_chunk(st, layer, 16, 16) for layer in range(st.kv_geometry.num_layers)),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "tokens 0..32 of layer 0 missing",
    ),
    "unknown codec": (
        lambda st: [_header(st, codec="int3")],
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown codec",
    ),
    "5 MiB frame": (
        lambda st: [
            _header(st),
            shard_pb2.KvChunk(
                layer=0, start_token=0, num_tokens=16, key_frame=bytes(5 << 20), value_frame=b""
            ),
        ],
        grpc.StatusCode.INVALID_ARGUMENT,
        "",
    ),
    "a later header with a token outside the vocabulary": (
        lambda st: _moved_request(st, [5], [5, 1 << 20]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "outside the vocabulary",
    ),
    "a later header past the context": (
        lambda st: _moved_request(st, [5], [5] * 4096),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds the context",
    ),
    "a later header that rewrites the output": (
        lambda st: _moved_request(st, [5, 6], [7, 8, 9]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not extend",
    ),
    "message past the cap": (
        lambda st: [
            _header(st),
            shard_pb2.KvChunk(
                layer=0, start_token=0, num_tokens=16, key_frame=bytes(MAX_MESSAGE_BYTES)
            ),
        ],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_import_streams_are_refused(replica, case: str) -> None:
    s, address, status = replica
    build, code, message = HOSTILE[case]
    result = _import(address, build(status))
    assert isinstance(result, grpc.RpcError), f"{case}: accepted"
    assert result.code() is code, f"{case}: {result.code()} {result.details()}"
    assert message in (result.details() or "")
    assert s.shards[0].engine.is_alive, f"{case}: the engine died"
    # The replica serves on, with every block back (a stream gRPC cut off is cleaned
    # up by its handler after the client already has the error).
    deadline = time.monotonic() + 10
    while idle_free_blocks(address) != status.kv_blocks_total:
        assert time.monotonic() < deadline, f"{case}: staged blocks were not freed"
        time.sleep(0.05)


def test_a_well_formed_prefix_is_imported(replica) -> None:
    s, address, status = replica
    messages = [_header(status, request_id="good")]
    messages += [_chunk(status, layer, 0, 32) for layer in range(status.kv_geometry.num_layers)]
    result = _import(address, messages)
    assert isinstance(result, shard_pb2.ImportKvResponse), result
    assert result.num_tokens == 32 and result.cached_tokens == 32


def _stub_call(address: str, method: str, request: object) -> object:
    with grpc.insecure_channel(address) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        try:
            result = getattr(stub, method)(request, timeout=30)
            return list(result) if method == "Generate" else result
        except grpc.RpcError as err:
            return err


def test_an_abort_ends_an_import_in_flight_and_frees_its_blocks(replica) -> None:
    """Abort of a request whose KV is still arriving ends the import (its blocks
    are freed by the import's clean-up, after its decodes) instead of freeing
    blocks the import goes on writing."""
    s, address, status = replica
    layers = status.kv_geometry.num_layers
    stall = threading.Event()

    def messages() -> Iterator[shard_pb2.KvChunk]:
        yield _request_header(status, [5])
        yield _chunk(status, 0, 0, 32)
        stall.wait(30)  # the sender stalls part way
        yield from (_chunk(status, layer, 0, 32) for layer in range(1, layers))

    with grpc.insecure_channel(address) as channel:
        future = shard_pb2_grpc.ShardStub(channel).ImportKv.future(messages(), timeout=30)
        deadline = time.monotonic() + 10
        while shard_status(address).kv_blocks_free == status.kv_blocks_total:
            assert time.monotonic() < deadline, "the import never staged its blocks"
            time.sleep(0.02)
        _stub_call(address, "Abort", shard_pb2.AbortRequest(request_id="moved"))
        stall.set()
        with pytest.raises(grpc.RpcError) as err:
            future.result(timeout=30)
    assert err.value.code() is grpc.StatusCode.ABORTED, err.value.details()
    assert idle_free_blocks(address) == status.kv_blocks_total
    assert s.shards[0].engine.is_alive


def test_a_generate_cannot_take_the_id_of_a_staged_request(replica) -> None:
    s, address, status = replica
    layers = status.kv_geometry.num_layers
    staged = [_request_header(status, [5]), *(_chunk(status, i, 0, 32) for i in range(layers))]
    assert isinstance(_import(address, staged), shard_pb2.ImportKvResponse)
    request = shard_pb2.ShardGenerateRequest(
        request_id="moved",
        prompt_token_ids=[1, 2, 3],
        sampling=inference_pb2.SamplingParams(max_tokens=4),
    )
    result = _stub_call(address, "Generate", request)
    assert isinstance(result, grpc.RpcError)
    assert result.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "already running" in (result.details() or "")
    _stub_call(address, "Abort", shard_pb2.AbortRequest(request_id="moved"))
    assert idle_free_blocks(address) == status.kv_blocks_total


def test_a_refused_import_keeps_a_handed_over_request_waiting_for_resume(replica) -> None:
    """A request handed over here decodes until Resume comes or its wait expires; an
    import for it that is refused must not cancel that expiry."""
    s, address, status = replica
    layers = status.kv_geometry.num_layers
    chunks = [_chunk(status, layer, 0, 32) for layer in range(layers)]
    handed_over = [_request_header(status, [5], commit=True, rid="h"), *chunks]
    assert isinstance(_import(address, handed_over), shard_pb2.ImportKvResponse)
    kv = s.shards[0].servicer.kv
    assert "h" in kv._expiry
    again = _import(address, [_request_header(status, [5], rid="h"), *chunks])
    assert isinstance(again, grpc.RpcError)
    assert again.code() is grpc.StatusCode.FAILED_PRECONDITION, again.details()
    assert "h" in kv._expiry, "the refused import cancelled the wait's expiry"
    _stub_call(address, "Abort", shard_pb2.AbortRequest(request_id="h"))
    assert idle_free_blocks(address) == status.kv_blocks_total
