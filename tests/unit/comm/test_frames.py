import math
import struct
import time
import tracemalloc
import zlib

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.comm.codecs import CODECS, CodecSpec, decode, encode
from serve.comm.frames import (
    FLAG_CHUNK,
    FLAG_LAST,
    MAGIC,
    FrameAssembler,
    FrameError,
    FrameHeader,
    decode_frame,
    encode_frame,
    iter_chunks,
    read_header,
)
from serve.errors import InvalidArgument

SPECS = ["none", "lossless", "int8", "int8+zstd", "fp8", "fp8+zstd", "int4", "int4+zstd", "kmeans4"]
DTYPE_ID = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODEC_ID = {name: i for i, name in enumerate(CODECS)}


def seal(
    *,
    codec: int = 2,
    zstd_level: int = 0,
    dtype: int = 1,
    shape: tuple[int, ...] = (4, 16),
    block_size: int = 64,
    raw_nbytes: int | None = None,
    payload: bytes = b"",
    payload_nbytes: int | None = None,
    checksum: int | None = None,
    flags: int = 0,
    chunk_index: int = 0,
    magic: bytes = MAGIC,
    version: int = 1,
    reserved: int = 0,
) -> bytes:
    """A frame with any header fields and valid checksums, written from the documented
    layout (independent of FrameHeader.pack)."""
    itemsize = {1: 4, 2: 2, 3: 2}.get(dtype, 4)
    raw = math.prod(shape) * itemsize if raw_nbytes is None else raw_nbytes
    body = struct.pack(
        "<4sBBBBHBBIIQQI",
        magic,
        version,
        codec,
        zstd_level,
        dtype,
        flags,
        len(shape),
        reserved,
        block_size,
        chunk_index,
        raw,
        len(payload) if payload_nbytes is None else payload_nbytes,
        zlib.crc32(payload) if checksum is None else checksum,
    ) + struct.pack(f"<{len(shape)}Q", *shape)
    return body + struct.pack("<II", zlib.crc32(body), 0) + payload


def int8_payload(shape: tuple[int, ...]) -> bytes:
    return bytes(encode(torch.randn(shape), CodecSpec("int8")).payload.numpy())


def zstd_declaring(size: int) -> bytes:
    """A zstd frame whose header declares `size` bytes but holds one 16-byte RLE block."""
    descriptor = bytes([0b1010_0000])  # 4-byte content size, single segment
    block = (1 | (1 << 1) | (16 << 3)).to_bytes(3, "little") + b"\0"  # last, RLE, 16 bytes
    return (
        zstandard.MAGIC_NUMBER.to_bytes(4, "little") + descriptor + struct.pack("<I", size) + block
    )


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(text: str, dtype: torch.dtype) -> None:
    spec = CodecSpec.parse(text)
    x = torch.randn(3, 5, 70).to(dtype)
    frame = encode_frame(x, spec)
    header = read_header(frame)
    assert header.shape == (3, 5, 70) and header.torch_dtype == dtype and header.spec == spec
    assert header.raw_nbytes == x.numel() * x.element_size()
    assert header.frame_nbytes == len(frame) and header.header_nbytes == 48 + 8 * 3
    y = decode_frame(frame, expected_shape=x.shape, expected_dtype=dtype)
    assert torch.equal(y, decode(encode(x, spec)))
    assert torch.equal(decode_frame(memoryview(frame)), y)
    assert torch.equal(decode_frame(bytearray(frame)), y)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,) * 8])
def test_round_trip_edge_shapes(shape: tuple[int, ...]) -> None:
    x = torch.full(shape, 2.0)
    for text in ("none", "lossless", "int4+zstd"):
        y = decode_frame(encode_frame(x, CodecSpec.parse(text)))
        assert y.shape == x.shape and torch.allclose(y, x, rtol=2.0**-7)


def test_exact_codecs_keep_nan_and_inf() -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-40])
    y = decode_frame(encode_frame(x, CodecSpec("lossless")))
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_header_pack_matches_the_documented_layout() -> None:
    x = torch.randn(4, 16)
    frame = encode_frame(x, CodecSpec("int8"))
    header = read_header(frame)
    assert frame == seal(shape=(4, 16), payload=frame[header.header_nbytes :])
    assert header.pack() == frame[: header.header_nbytes]


def test_encode_frame_refuses_what_cannot_travel() -> None:
    with pytest.raises(InvalidArgument):
        encode_frame(torch.zeros((1,) * 9), CodecSpec("none"))
    with pytest.raises(InvalidArgument):
        encode_frame(torch.zeros(3, dtype=torch.complex64), CodecSpec("none"))


# --- refusals ------------------------------------------------------------------------------


def refused(data: bytes, match: str, **kwargs) -> None:
    with pytest.raises(FrameError, match=match):
        decode_frame(data, **kwargs)


def test_bad_magic_and_version() -> None:
    refused(seal(magic=b"XXXX", payload=int8_payload((4, 16))), "magic")
    refused(seal(version=2, payload=int8_payload((4, 16))), "version")


def test_truncated_frames() -> None:
    frame = encode_frame(torch.randn(4, 16), CodecSpec("int8"))
    for cut in (0, 10, 39, 40, 50, 60, len(frame) - 1):
        with pytest.raises(FrameError, match="truncated"):
            decode_frame(frame[:cut])
    refused(frame + b"\0", "trailing")


def test_flipped_bytes_fail_a_checksum() -> None:
    frame = bytearray(encode_frame(torch.randn(4, 16), CodecSpec.parse("int8+zstd")))
    for pos in range(len(frame)):
        bad = bytearray(frame)
        bad[pos] ^= 0x10
        with pytest.raises(FrameError):
            decode_frame(bytes(bad))
    bad = bytearray(frame)
    bad[-1] ^= 1
    refused(bytes(bad), "payload checksum")
    bad = bytearray(frame)
    bad[20] ^= 1  # raw nbytes
    refused(bytes(bad), "header checksum")


def test_unknown_ids_and_flags() -> None:
    payload = int8_payload((4, 16))
    refused(seal(codec=6, payload=payload), "unknown codec id 6")
    refused(seal(dtype=0, payload=payload), "unknown dtype id 0")
    refused(seal(dtype=42, payload=payload), "unknown dtype id 42")
    refused(seal(flags=4, payload=payload), "unknown flag")
    refused(seal(flags=FLAG_LAST, payload=payload), "LAST without CHUNK")
    refused(seal(reserved=1, payload=payload), "reserved")
    refused(seal(shape=(1,) * 9, payload=payload), "rank 9")
    refused(seal(codec=CODEC_ID["int8"], dtype=5, raw_nbytes=4 * 16 * 8, payload=payload), "dtype")
    refused(seal(codec=CODEC_ID["none"], zstd_level=1, payload=payload), "codec parameters")
    refused(seal(codec=CODEC_ID["int8"], zstd_level=40, payload=payload), "codec parameters")
    refused(seal(codec=CODEC_ID["lossless"], zstd_level=0, payload=payload), "non-canonical")
    refused(seal(codec=CODEC_ID["int8"], block_size=0, payload=payload), "codec parameters")


def test_shape_inconsistent_with_sizes() -> None:
    payload = int8_payload((4, 16))
    refused(seal(raw_nbytes=4 * 16 * 4 + 4, payload=payload), "header says")
    refused(seal(shape=(2**31, 2**31), raw_nbytes=256, payload=payload), "header says")
    refused(seal(shape=(2**40, 0), raw_nbytes=256, payload=payload), "header says")
    for shape in [(2**63, 0), (2**62, 4, 0), (0, 2**31, 2**31, 2)]:
        refused(seal(shape=shape, raw_nbytes=0, payload=b""), "too large")
    assert decode_frame(seal(shape=(2**40, 0), raw_nbytes=0, payload=b"")).shape == (2**40, 0)
    refused(seal(shape=(4, 17), payload=payload), "needs exactly")


def test_expected_shape_and_dtype() -> None:
    frame = encode_frame(torch.randn(4, 16), CodecSpec("int8"))
    refused(frame, "expected", expected_shape=(16, 4))
    refused(frame, "expected", expected_shape=(4, 16, 1))
    refused(frame, "expected", expected_dtype=torch.bfloat16)
    assert decode_frame(frame, expected_shape=torch.Size([4, 16])).shape == (4, 16)


def test_wrong_scale_count_is_refused() -> None:
    x = torch.randn(4, 64)  # 256 values: 4 scales at block 64, 2 at block 128
    payload128 = bytes(encode(x, CodecSpec("int8", block_size=128)).payload.numpy())
    assert len(payload128) == 256 + 2 * 2
    # a sender that quantized with block 128 but declares 64
    refused(seal(shape=(4, 64), payload=payload128), "needs exactly 264")
    payload = bytes(encode(x, CodecSpec("int8")).payload.numpy())
    refused(seal(shape=(4, 64), payload=payload[2:]), "needs exactly 264")
    refused(seal(shape=(4, 64), payload=payload + b"\0\0"), "needs exactly 264")
    refused(seal(shape=(4, 64), payload=payload, block_size=128), "needs exactly 260")
    assert decode_frame(seal(shape=(4, 64), payload=payload)).shape == (4, 64)


def test_raw_size_cap() -> None:
    frame = encode_frame(torch.randn(64, 64), CodecSpec("int4"))
    refused(frame, "exceeds the cap", max_raw_nbytes=64 * 64 * 4 - 1)
    assert decode_frame(frame, max_raw_nbytes=64 * 64 * 4).shape == (64, 64)


# --- zstd bombs ----------------------------------------------------------------------------


def bounded(fn, max_bytes: int = 16 << 20, max_s: float = 1.0) -> None:
    """fn raises FrameError fast, without large Python-heap allocations."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(FrameError):
            fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < max_bytes
    assert time.perf_counter() - start < max_s


def test_zstd_frame_declaring_one_gib_is_refused() -> None:
    bomb = zstd_declaring(1 << 30)
    assert zstandard.frame_content_size(bomb) == 1 << 30
    lossless = CODEC_ID["lossless"]
    # small tensor, payload declares 1 GiB
    small = seal(codec=lossless, zstd_level=1, shape=(16,), payload=bomb)
    bounded(lambda: decode_frame(small))
    # header claims 1 GiB too: the cap refuses it before the payload is looked at
    big = seal(codec=lossless, zstd_level=1, shape=(1 << 28,), payload=bomb)
    bounded(lambda: decode_frame(big, max_raw_nbytes=64 << 20))
    with pytest.raises(FrameError, match="cap"):
        decode_frame(big, max_raw_nbytes=64 << 20)
    # a lossy codec: int8 of 64 floats expects 66 bytes, the frame declares 1 GiB
    lossy = seal(codec=CODEC_ID["int8"], zstd_level=1, shape=(64,), payload=bomb)
    with pytest.raises(FrameError, match="declares 1073741824"):
        decode_frame(lossy)


def test_zstd_frame_without_size_cannot_expand_past_expected() -> None:
    cobj = zstandard.ZstdCompressor().compressobj()
    bomb = cobj.compress(b"\0" * (8 << 20)) + cobj.flush()  # 8 MiB in a few hundred bytes
    assert zstandard.frame_content_size(bomb) == -1
    frame = seal(codec=CODEC_ID["lossless"], zstd_level=1, shape=(16,), payload=bomb)
    bounded(lambda: decode_frame(frame), max_bytes=1 << 20)


def test_zstd_payload_too_large_for_its_shape() -> None:
    payload = bytes(1000)
    refused(seal(codec=CODEC_ID["int4"], zstd_level=1, shape=(4,), payload=payload), "impossible")
    refused(seal(codec=CODEC_ID["int4"], zstd_level=1, shape=(4,), payload=b""), "impossible")


# --- fuzz ----------------------------------------------------------------------------------

VALID = [
    encode_frame(torch.randn(3, 40).to(dtype), CodecSpec.parse(text))
    for text in SPECS
    for dtype in (torch.float32, torch.bfloat16)
]


def decode_or_frame_error(data: bytes) -> None:
    try:
        y = decode_frame(data, max_raw_nbytes=1 << 20)
    except FrameError:
        return
    assert y.numel() * y.element_size() <= 1 << 20


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_frame_error(data)
    decode_or_frame_error(MAGIC + data)
    decode_or_frame_error(MAGIC + b"\x01" + data)


@settings(max_examples=300, deadline=None)
@given(
    frame=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(1, 255)),
        min_size=1,
        max_size=4,
        unique_by=lambda e: e[0],
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
    extra=st.binary(max_size=8),
)
def test_fuzz_mutated_frames(frame: bytes, edits, cut, extra: bytes) -> None:
    data = bytearray(frame)
    for pos, xor in {pos % len(data): xor for pos, xor in edits}.items():
        data[pos] ^= xor
    if cut is not None:
        data = data[: cut % len(data)]
    with pytest.raises(FrameError):
        decode_frame(bytes(data) + extra, max_raw_nbytes=1 << 20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.integers(0, 7),
    zstd_level=st.sampled_from([0, 1, 3, 23, 255]),
    dtype=st.integers(0, 10),
    shape=st.lists(st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2**62]), max_size=9).map(
        tuple
    )
    | st.lists(st.integers(0, 70), max_size=3).map(tuple),
    block_size=st.sampled_from([0, 1, 32, 64, 1 << 20]),
    flags=st.integers(0, 7),
    chunk_index=st.integers(0, 3),
    payload=st.binary(max_size=300) | st.sampled_from([f[-200:] for f in VALID]),
    raw_delta=st.sampled_from([0, 0, 0, 1, -1]),
)
def test_fuzz_resealed_headers(
    codec, zstd_level, dtype, shape, block_size, flags, chunk_index, payload, raw_delta
) -> None:
    """Headers with valid checksums but arbitrary fields reach the deeper checks."""
    itemsize = {1: 4, 2: 2, 3: 2}.get(dtype, 4)
    raw = max(0, math.prod(shape) * itemsize + raw_delta)
    data = seal(
        codec=codec,
        zstd_level=zstd_level,
        dtype=dtype,
        shape=shape,
        block_size=block_size,
        raw_nbytes=min(raw, 2**64 - 1),
        payload=payload,
        flags=flags,
        chunk_index=chunk_index,
    )
    decode_or_frame_error(data)


def test_fuzzed_payload_of_the_right_size_decodes() -> None:
    """Any bytes of the exact size are a valid non-zstd payload (garbage in, no crash)."""
    gen = torch.Generator().manual_seed(0)
    for name, nbytes in (
        ("int8", 4 * 16 + 2),
        ("fp8", 4 * 16 + 2),
        ("int4", 32 + 4),
        ("kmeans4", 96),
    ):
        payload = bytes(torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8).numpy())
        frame = seal(
            codec=CODEC_ID[name],
            shape=(4, 16),
            payload=payload,
            block_size=32 if name == "int4" else 64,
        )
        assert decode_frame(frame).shape == (4, 16)


# --- chunking ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple),
    chunk_numel=st.integers(1, 40),
    text=st.sampled_from(["none", "lossless", "int8", "int4+zstd"]),
)
def test_chunks_reassemble(shape, chunk_numel, text) -> None:
    x = torch.randn(shape).bfloat16()
    spec = CodecSpec.parse(text)
    frames = list(iter_chunks(x, spec, chunk_numel))
    headers = [read_header(f) for f in frames]
    assert [h.chunk_index for h in headers] == list(range(len(frames)))
    assert all(h.is_chunk for h in headers) and [h.is_last for h in headers][-1]
    assert not any(h.is_last for h in headers[:-1])
    asm = FrameAssembler(expected_shape=shape, expected_dtype=torch.bfloat16)
    done = [asm.add(f) for f in frames]
    assert done[-1] and not any(done[:-1]) and asm.done
    y = asm.result()
    assert y.shape == x.shape
    if spec.is_exact:
        assert torch.equal(y, x)
    if x.dim() and x.shape[0] and math.prod(x.shape[1:]):
        rows = max(1, chunk_numel // math.prod(x.shape[1:]))
        assert len(frames) == -(-x.shape[0] // rows)


def test_assembler_takes_a_plain_frame() -> None:
    x = torch.randn(3, 4)
    asm = FrameAssembler()
    assert asm.add(encode_frame(x, CodecSpec("none")))
    assert torch.equal(asm.result(), x)
    with pytest.raises(FrameError, match="after the last"):
        asm.add(encode_frame(x, CodecSpec("none")))


def test_assembler_refusals() -> None:
    spec = CodecSpec("none")
    x = torch.randn(6, 4)
    frames = list(iter_chunks(x, spec, 8))  # 3 chunks of 2 rows
    assert len(frames) == 3

    asm = FrameAssembler()
    with pytest.raises(FrameError, match="chunk 1 arrived, expected 0"):
        asm.add(frames[1])
    asm.add(frames[0])
    with pytest.raises(FrameError, match="incomplete"):
        asm.result()
    with pytest.raises(FrameError, match="chunk 2 arrived"):
        asm.add(frames[2])

    other = list(iter_chunks(torch.randn(6, 5), spec, 10))
    asm = FrameAssembler()
    asm.add(frames[0])
    with pytest.raises(FrameError, match="does not continue"):
        asm.add(other[1])
    half = list(iter_chunks(x.half(), spec, 8))
    with pytest.raises(FrameError, match="dtype"):
        asm.add(half[1])
    with pytest.raises(FrameError, match="plain frame"):
        asm.add(seal(codec=0, shape=(2, 4), payload=bytes(32), chunk_index=1))

    asm = FrameAssembler(expected_shape=(4, 4))
    asm.add(frames[0])
    asm.add(frames[1])
    with pytest.raises(FrameError, match="more than the expected 4 rows"):
        asm.add(frames[2])
    asm = FrameAssembler(expected_shape=(8, 4))
    asm.add(frames[0])
    asm.add(frames[1])
    with pytest.raises(FrameError, match="assembled shape"):
        asm.add(frames[2])
    with pytest.raises(FrameError, match="does not fit"):
        FrameAssembler(expected_shape=(6, 5)).add(frames[0])

    scalar_chunk = seal(codec=0, shape=(), payload=bytes(4), flags=FLAG_CHUNK)
    with pytest.raises(FrameError, match="0-d"):
        FrameAssembler().add(scalar_chunk)

    asm = FrameAssembler(max_raw_nbytes=6 * 4 * 4 - 1)  # the cap counts the whole tensor
    asm.add(frames[0])
    asm.add(frames[1])
    with pytest.raises(FrameError, match="cap"):
        asm.add(frames[2])
    with pytest.raises(InvalidArgument):
        next(iter_chunks(x, spec, 0))


def test_chunks_carry_their_own_codec_state() -> None:
    x = torch.randn(100, 896).bfloat16()
    frames = list(iter_chunks(x, CodecSpec.parse("int8+zstd"), 16 * 896))
    assert len(frames) == 7
    asm = FrameAssembler(expected_shape=x.shape)
    for f in frames:
        asm.add(f)
    y = asm.result()
    assert (y.float() - x.float()).abs().max() < 0.05 * x.float().abs().max()
    header = FrameHeader(**{**read_header(frames[0]).__dict__})
    assert header == read_header(frames[0])
