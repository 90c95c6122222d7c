"""Frames: how a tensor travels on a gRPC stream (KV moves, activations).

A frame is a header followed by the codec payload. The header is little-endian:

    offset size  field
    0      4     magic b"SWF1"
    4      1     version (1)
    5      1     codec id      none 0, lossless 1, int8 2, fp8 3, int4 4, kmeans4 5
    6      1     zstd level    0 = no zstd stage
    7      1     dtype id      float32 1, float16 2, bfloat16 3, float64 4, int64 5,
                               int32 6, int16 7, int8 8, uint8 9
    8      2     flags         bit 0 CHUNK (a slice along dim 0 of a larger tensor),
                               bit 1 LAST (the last chunk); other bits must be 0
    10     1     rank          0..8
    11     1     reserved      0
    12     4     block size
    16     4     chunk index   0, 1, 2, ... within a chunked tensor (0 otherwise)
    20     8     raw nbytes    numel * itemsize of the tensor in this frame
    28     8     payload nbytes
    36     4     payload crc32 (zlib.crc32)
    40     8*rank dims, u64 each
    40+8r  4     header crc32  of bytes [0, 40 + 8*rank)
    44+8r  4     reserved      0
    48+8r        payload

`decode_frame` refuses, with `FrameError`, before allocating anything sized by the
header: a short buffer, bad magic or version, a header checksum mismatch, unknown
codec/dtype ids or flag bits, a codec/dtype pair that does not exist, dims whose
product * itemsize differs from raw nbytes (or whose non-zero product passes
2^62), raw nbytes above the cap, a shape or dtype other than the expected ones, a
payload length different from the header's or (without zstd) from the codec's
exact size for that shape (so a wrong scale count is caught), and a payload
checksum mismatch. A zstd payload must declare exactly the expected size in its
frame header, or (when it omits its size) is decompressed with the expected size
as the output limit, so nothing can expand past the cap.

`iter_chunks` cuts a large tensor along dim 0 into frames that `FrameAssembler`
puts back together: a sender encodes chunk k+1 while chunk k is on the wire.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from serve.comm import codecs
from serve.comm.codecs import CodecError, CodecSpec
from serve.errors import InvalidArgument

logger = logging.getLogger(__name__)

MAGIC = b"SWF1"
VERSION = 1
MAX_RANK = 8
DEFAULT_MAX_RAW_NBYTES = 1 << 30
MAX_DIMS_PRODUCT = 1 << 62  # product of the non-zero dims; torch's numel must not overflow

FLAG_CHUNK = 1
FLAG_LAST = 2
KNOWN_FLAGS = FLAG_CHUNK | FLAG_LAST

CODEC_IDS: dict[str, int] = {name: i for i, name in enumerate(codecs.CODECS)}
CODEC_NAMES: dict[int, str] = {i: name for name, i in CODEC_IDS.items()}
DTYPE_IDS: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
}
DTYPES: dict[int, torch.dtype] = {i: dtype for dtype, i in DTYPE_IDS.items()}

# magic, version, codec, zstd level, dtype, flags, rank, reserved, block size, chunk index,
# raw nbytes, payload nbytes, payload crc32
_FIXED = struct.Struct("<4sBBBBHBBIIQQI")
_TRAILER = struct.Struct("<II")  # header crc32, reserved
assert _FIXED.size == 40


class FrameError(InvalidArgument):
    """A frame that is refused; the message says why."""


@dataclass(frozen=True)
class FrameHeader:
    version: int
    codec: int
    zstd_level: int
    dtype: int
    shape: tuple[int, ...]
    block_size: int
    raw_nbytes: int
    payload_nbytes: int
    checksum: int
    flags: int = 0
    chunk_index: int = 0

    @property
    def spec(self) -> CodecSpec:
        return CodecSpec(CODEC_NAMES[self.codec], self.zstd_level, self.block_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def header_nbytes(self) -> int:
        return _FIXED.size + 8 * len(self.shape) + _TRAILER.size

    @property
    def frame_nbytes(self) -> int:
        return self.header_nbytes + self.payload_nbytes

    @property
    def is_chunk(self) -> bool:
        return bool(self.flags & FLAG_CHUNK)

    @property
    def is_last(self) -> bool:
        return bool(self.flags & FLAG_LAST)

    def pack(self) -> bytes:
        body = _FIXED.pack(
            MAGIC,
            self.version,
            self.codec,
            self.zstd_level,
            self.dtype,
            self.flags,
            len(self.shape),
            0,
            self.block_size,
            self.chunk_index,
            self.raw_nbytes,
            self.payload_nbytes,
            self.checksum,
        ) + struct.pack(f"<{len(self.shape)}Q", *self.shape)
        return body + _TRAILER.pack(zlib.crc32(body), 0)


def encode_frame(x: torch.Tensor, spec: CodecSpec) -> bytes:
    """One frame holding all of `x`."""
    return _build_frame(x, spec, flags=0, chunk_index=0)


def read_header(
    data: bytes | bytearray | memoryview, max_raw_nbytes: int = DEFAULT_MAX_RAW_NBYTES
) -> FrameHeader:
    """Parses and validates a header (everything but the payload checksum), reading no
    more than the header bytes and allocating nothing sized by them."""
    view = memoryview(data).cast("B")
    if len(view) < _FIXED.size:
        need = _FIXED.size + _TRAILER.size
        raise FrameError(f"truncated frame: {len(view)} bytes, a header needs at least {need}")
    (
        magic,
        version,
        codec_id,
        zstd_level,
        dtype_id,
        flags,
        rank,
        reserved,
        block_size,
        chunk_index,
        raw_nbytes,
        payload_nbytes,
        checksum,
    ) = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}, this build reads {VERSION}")
    if rank > MAX_RANK:
        raise FrameError(f"rank {rank} exceeds the maximum {MAX_RANK}")
    dims_end = _FIXED.size + 8 * rank
    if len(view) < dims_end + _TRAILER.size:
        raise FrameError(
            f"truncated frame: {len(view)} bytes, the header needs {dims_end + _TRAILER.size}"
        )
    header_crc, reserved2 = _TRAILER.unpack_from(view, dims_end)
    if zlib.crc32(view[:dims_end]) != header_crc:
        raise FrameError("header checksum mismatch")
    if reserved or reserved2:
        raise FrameError("reserved header bytes are not zero")
    if flags & ~KNOWN_FLAGS:
        raise FrameError(f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if flags & FLAG_LAST and not flags & FLAG_CHUNK:
        raise FrameError("flag LAST without CHUNK")
    if codec_id not in CODEC_NAMES:
        raise FrameError(f"unknown codec id {codec_id}")
    if dtype_id not in DTYPES:
        raise FrameError(f"unknown dtype id {dtype_id}")
    dtype = DTYPES[dtype_id]
    try:
        spec = CodecSpec(CODEC_NAMES[codec_id], zstd_level, block_size)
        codecs.check_dtype(dtype, spec)
    except CodecError as exc:
        raise FrameError(f"bad codec parameters: {exc.message}") from None
    if spec.zstd_level != zstd_level or spec.block_size != block_size:
        raise FrameError(
            f"non-canonical codec parameters: {spec.name} with zstd level {zstd_level}, "
            f"block size {block_size}"
        )
    shape = struct.unpack_from(f"<{rank}Q", view, _FIXED.size)
    if math.prod(max(d, 1) for d in shape) > MAX_DIMS_PRODUCT:
        raise FrameError(f"dims {shape} are too large for any tensor")
    numel = math.prod(shape)
    if numel * dtype.itemsize != raw_nbytes:
        raise FrameError(
            f"shape {shape} of {dtype} is {numel * dtype.itemsize} bytes, header says {raw_nbytes}"
        )
    if raw_nbytes > max_raw_nbytes:
        raise FrameError(f"frame of {raw_nbytes} raw bytes exceeds the cap of {max_raw_nbytes}")
    inner = codecs.inner_nbytes(numel, dtype, spec)
    if spec.has_zstd:
        if not 0 < payload_nbytes <= codecs.zstd_bound(inner):
            raise FrameError(
                f"zstd payload of {payload_nbytes} bytes is impossible for {inner} bytes of data"
            )
    elif payload_nbytes != inner:
        raise FrameError(
            f"{spec.name} payload of {payload_nbytes} bytes, shape {shape} needs exactly {inner}"
        )
    return FrameHeader(
        version=version,
        codec=codec_id,
        zstd_level=zstd_level,
        dtype=dtype_id,
        shape=shape,
        block_size=block_size,
        raw_nbytes=raw_nbytes,
        payload_nbytes=payload_nbytes,
        checksum=checksum,
        flags=flags,
        chunk_index=chunk_index,
    )


def decode_frame(
    data: bytes | bytearray | memoryview,
    max_raw_nbytes: int = DEFAULT_MAX_RAW_NBYTES,
    expected_shape: tuple[int, ...] | torch.Size | None = None,
    expected_dtype: torch.dtype | None = None,
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The tensor in a frame, on `device`. Every refusal raises FrameError."""
    header = read_header(data, max_raw_nbytes)
    return _decode_checked(data, header, expected_shape, expected_dtype, device)


def iter_chunks(x: torch.Tensor, spec: CodecSpec, chunk_numel: int) -> Iterator[bytes]:
    """Frames of consecutive slices of `x` along dim 0, each about `chunk_numel`
    elements (at least one row). A 0-d tensor or one with no rows is one chunk. Each
    frame is encoded when the consumer asks for it, so sending chunk k overlaps
    nothing but lets the caller encode chunk k+1 while chunk k is on the wire."""
    if chunk_numel < 1:
        raise InvalidArgument(f"chunk_numel must be >= 1, got {chunk_numel}")
    if x.dim() == 0 or x.shape[0] == 0:
        yield _build_frame(x, spec, flags=FLAG_CHUNK | FLAG_LAST, chunk_index=0)
        return
    rows = x.shape[0]
    row_numel = math.prod(x.shape[1:])
    step = max(1, chunk_numel // max(row_numel, 1))
    for index, start in enumerate(range(0, rows, step)):
        last = start + step >= rows
        flags = FLAG_CHUNK | (FLAG_LAST if last else 0)
        yield _build_frame(x[start : start + step], spec, flags=flags, chunk_index=index)


class FrameAssembler:
    """Puts back a tensor sent as `iter_chunks` frames (or as one plain frame).

    Before it is decoded, every chunk is checked for its index, against the first
    chunk (dtype and trailing dims; each chunk may use another codec), against the
    expected shape and dtype when given, and against the raw-byte cap counted over
    the whole tensor."""

    def __init__(
        self,
        max_raw_nbytes: int = DEFAULT_MAX_RAW_NBYTES,
        expected_shape: tuple[int, ...] | torch.Size | None = None,
        expected_dtype: torch.dtype | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        self.max_raw_nbytes = max_raw_nbytes
        self.expected_shape = tuple(expected_shape) if expected_shape is not None else None
        self.expected_dtype = expected_dtype
        self.device = device
        self.num_chunks = 0
        self.num_rows = 0
        self.raw_nbytes = 0
        self._first: FrameHeader | None = None
        self._parts: list[torch.Tensor] = []
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def add(self, data: bytes | bytearray | memoryview) -> bool:
        """Adds the next frame; True once the tensor is complete."""
        if self._done:
            raise FrameError("frame after the last chunk")
        header = read_header(data, self.max_raw_nbytes - self.raw_nbytes)
        self._check_chunk(header)
        part = _decode_checked(data, header, None, self.expected_dtype, self.device)
        if self._first is None:
            self._first = header
        self._parts.append(part)
        self.num_chunks += 1
        self.num_rows += header.shape[0] if header.shape else 1
        self.raw_nbytes += header.raw_nbytes
        self._done = header.is_last or not header.is_chunk
        if self._done and self.expected_shape is not None and self._shape() != self.expected_shape:
            raise FrameError(f"assembled shape {self._shape()}, expected {self.expected_shape}")
        return self._done

    def result(self) -> torch.Tensor:
        """The whole tensor; only once `done`."""
        if not self._done:
            raise FrameError(f"tensor incomplete: {self.num_chunks} chunks, no last chunk yet")
        if len(self._parts) == 1:
            return self._parts[0]
        return torch.cat(self._parts, dim=0)

    def _shape(self) -> tuple[int, ...]:
        assert self._first is not None
        if not self._first.shape:
            return ()
        return (self.num_rows, *self._first.shape[1:])

    def _check_chunk(self, header: FrameHeader) -> None:
        if header.chunk_index != self.num_chunks:
            raise FrameError(f"chunk {header.chunk_index} arrived, expected {self.num_chunks}")
        if not header.is_chunk and self.num_chunks:
            raise FrameError("a plain frame in the middle of a chunked tensor")
        if not header.shape and not (header.is_last or not header.is_chunk):
            raise FrameError("a 0-d tensor must be a single frame")
        first = self._first
        if first is not None:
            if header.dtype != first.dtype:
                raise FrameError(f"chunk dtype {header.torch_dtype}, first was {first.torch_dtype}")
            if header.shape[1:] != first.shape[1:] or not header.shape:
                raise FrameError(f"chunk shape {header.shape} does not continue {first.shape}")
        expected = self.expected_shape
        if expected is not None:
            if len(header.shape) != len(expected) or header.shape[1:] != expected[1:]:
                raise FrameError(f"chunk shape {header.shape} does not fit {expected}")
            if header.shape and self.num_rows + header.shape[0] > expected[0]:
                raise FrameError(f"more than the expected {expected[0]} rows")


def _build_frame(x: torch.Tensor, spec: CodecSpec, *, flags: int, chunk_index: int) -> bytes:
    return b"".join(_frame_pieces(_encode_checked(x, spec), flags=flags, chunk_index=chunk_index))


# A frame as its two pieces, header and payload, for writers that copy them straight
# into a larger message (their concatenation is the frame).
FramePieces = tuple[bytes, bytes | memoryview]


def encode_frame_pieces(x: torch.Tensor, spec: CodecSpec) -> FramePieces:
    """encode_frame(x, spec) as its header and its payload."""
    return _frame_pieces(_encode_checked(x, spec), flags=0, chunk_index=0)


def inner_frame_pieces(
    inner: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], spec: CodecSpec
) -> FramePieces:
    """The frame, as header and payload, of a tensor of this dtype and shape whose
    codec payload before the zstd stage a caller computed itself (see
    codecs.encode_along)."""
    _check_frameable(len(shape), dtype)
    return _frame_pieces(codecs.encoded(inner, dtype, shape, spec), flags=0, chunk_index=0)


def _encode_checked(x: torch.Tensor, spec: CodecSpec) -> codecs.Encoded:
    _check_frameable(x.dim(), x.dtype)
    return codecs.encode(x, spec)


def _check_frameable(rank: int, dtype: torch.dtype) -> None:
    if rank > MAX_RANK:
        raise InvalidArgument(f"rank {rank} exceeds the frame maximum {MAX_RANK}")
    if dtype not in DTYPE_IDS:
        raise InvalidArgument(f"dtype {dtype} cannot travel in a frame")


def _frame_pieces(enc: codecs.Encoded, *, flags: int, chunk_index: int) -> FramePieces:
    if isinstance(enc.payload, torch.Tensor):
        payload: bytes | memoryview = memoryview(enc.payload.cpu().contiguous().numpy())
    else:
        payload = enc.payload
    spec = enc.spec
    header = FrameHeader(
        version=VERSION,
        codec=CODEC_IDS[spec.name],
        zstd_level=spec.zstd_level,
        dtype=DTYPE_IDS[enc.dtype],
        shape=tuple(enc.shape),
        block_size=spec.block_size,
        raw_nbytes=enc.raw_nbytes,
        payload_nbytes=len(payload),
        checksum=zlib.crc32(payload),
        flags=flags,
        chunk_index=chunk_index,
    )
    return header.pack(), payload


def _decode_checked(
    data: bytes | bytearray | memoryview,
    header: FrameHeader,
    expected_shape: tuple[int, ...] | torch.Size | None,
    expected_dtype: torch.dtype | None,
    device: torch.device | str,
) -> torch.Tensor:
    payload = _checked_payload(data, header, expected_shape, expected_dtype)
    try:
        return codecs.decode_bytes(payload, header.torch_dtype, header.shape, header.spec, device)
    except CodecError as exc:
        raise FrameError(f"bad payload: {exc.message}") from None


def frame_inner(
    data: bytes | bytearray | memoryview,
    header: FrameHeader,
    expected_shape: tuple[int, ...],
    expected_dtype: torch.dtype,
) -> torch.Tensor:
    """The codec payload before the zstd stage (a fresh flat uint8 CPU tensor) of a
    frame whose header `read_header` gave, after every check `decode_frame` makes;
    for callers that decode the payload themselves (see codecs.decode_along)."""
    payload = _checked_payload(data, header, expected_shape, expected_dtype)
    try:
        return codecs.inner_of(payload, header.torch_dtype, header.shape, header.spec)
    except CodecError as exc:
        raise FrameError(f"bad payload: {exc.message}") from None


def _checked_payload(
    data: bytes | bytearray | memoryview,
    header: FrameHeader,
    expected_shape: tuple[int, ...] | torch.Size | None,
    expected_dtype: torch.dtype | None,
) -> memoryview:
    if expected_dtype is not None and header.torch_dtype != expected_dtype:
        raise FrameError(f"frame dtype {header.torch_dtype}, expected {expected_dtype}")
    if expected_shape is not None and header.shape != tuple(expected_shape):
        raise FrameError(f"frame shape {header.shape}, expected {tuple(expected_shape)}")
    view = memoryview(data).cast("B")
    have = len(view) - header.header_nbytes
    if have != header.payload_nbytes:
        what = "truncated frame" if have < header.payload_nbytes else "trailing bytes after frame"
        raise FrameError(f"{what}: payload is {have} bytes, header says {header.payload_nbytes}")
    payload = view[header.header_nbytes :]
    if zlib.crc32(payload) != header.checksum:
        raise FrameError("payload checksum mismatch")
    return payload
