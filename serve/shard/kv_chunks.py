"""KvChunk messages written straight from their frames' pieces.

A chunk of KV is two frames (keys, values) of up to a few MiB. Built as a
`shard_pb2.KvChunk` and serialized by gRPC, its bytes are copied three times
(frame header + payload joined, into the message, out of it on the event loop's
thread); `wire_chunk` writes the message's protobuf encoding once, on the
encoding worker, and the ImportKv call sends those bytes as they are
(`serialize_chunk`). What goes on the wire is exactly what
`KvChunk.SerializeToString()` gives (fields in number order, zero ones left out).
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwire.v1 import shard_pb2

from serve.comm.frames import FramePieces

# Protobuf tags of KvChunk's fields: field number << 3 | wire type (0 varint, 2 bytes).
_LAYER, _START, _NUM_TOKENS = 2 << 3, 3 << 3, 4 << 3
_KEY_FRAME, _VALUE_FRAME = 5 << 3 | 2, 6 << 3 | 2


@dataclass(frozen=True)
class WireChunk:
    """A serialized KvChunk of keys and values (no header), with its fields at hand."""

    layer: int
    start_token: int
    num_tokens: int
    data: bytes  # KvChunk's protobuf encoding
    frame_bytes: int  # the two frames' bytes

    def message(self) -> shard_pb2.KvChunk:
        return shard_pb2.KvChunk.FromString(self.data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _scalar(tag: int, value: int) -> bytes:
    return _varint(tag) + _varint(value) if value else b""


def _frame_field(tag: int, pieces: FramePieces) -> list[bytes | memoryview]:
    header, payload = pieces
    n = len(header) + memoryview(payload).nbytes
    return [_varint(tag) + _varint(n), header, payload] if n else []


def wire_chunk(
    layer: int, start_token: int, num_tokens: int, key: FramePieces, value: FramePieces
) -> WireChunk:
    """The KvChunk of one layer's tokens [start_token, start_token + num_tokens)."""
    head = _scalar(_LAYER, layer) + _scalar(_START, start_token) + _scalar(_NUM_TOKENS, num_tokens)
    parts = [head, *_frame_field(_KEY_FRAME, key), *_frame_field(_VALUE_FRAME, value)]
    frame_bytes = sum(memoryview(p).nbytes for p in (*key, *value))
    return WireChunk(layer, start_token, num_tokens, b"".join(parts), frame_bytes)


def serialize_chunk(msg: shard_pb2.KvChunk | WireChunk) -> bytes:
    """ImportKv's request serializer: a WireChunk is already its encoding."""
    if isinstance(msg, WireChunk):
        return msg.data
    return msg.SerializeToString()
