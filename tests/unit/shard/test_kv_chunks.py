"""WireChunk: KvChunk messages written from their frames' pieces are exactly what
protobuf writes for the same chunk, and parse back to it."""

from __future__ import annotations

import pytest
import torch
from shardwire.v1 import shard_pb2

from serve.comm.kv_codecs import KvCodec, encode_kv, encode_kv_pieces
from serve.shard.kv_chunks import serialize_chunk, wire_chunk


@pytest.mark.parametrize("codec", ["none", "lossless", "int8", "int4+zstd"])
@pytest.mark.parametrize(
    ("layer", "start", "tokens"),
    [(0, 0, 64), (1, 0, 1), (0, 64, 128), (300, 1 << 20, 64), (127, 128, 17)],
)
def test_a_wire_chunk_is_the_protobuf_encoding(codec: str, layer: int, start: int, tokens: int):
    gen = torch.Generator().manual_seed(layer + start + tokens)
    k = torch.randn(tokens, 2, 16, generator=gen)
    v = torch.randn(tokens, 2, 16, generator=gen)
    key, value = encode_kv_pieces(k, v, KvCodec.parse(codec))
    chunk = wire_chunk(layer, start, tokens, key, value)
    kf, vf = encode_kv(k, v, KvCodec.parse(codec))
    message = shard_pb2.KvChunk(
        layer=layer, start_token=start, num_tokens=tokens, key_frame=kf, value_frame=vf
    )
    assert chunk.data == message.SerializeToString()
    assert chunk.message() == message
    assert chunk.frame_bytes == len(kf) + len(vf)
    assert (chunk.layer, chunk.start_token, chunk.num_tokens) == (layer, start, tokens)
    assert serialize_chunk(chunk) == chunk.data


def test_a_message_is_serialized_by_protobuf() -> None:
    header = shard_pb2.KvChunk(header=shard_pb2.KvHeader(request_id="r", end_token=64))
    assert serialize_chunk(header) == header.SerializeToString()
