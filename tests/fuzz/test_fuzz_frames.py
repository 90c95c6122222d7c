"""Fuzzing the frame decoder (serve.comm.frames): random bytes, frames whose header
fields are arbitrary but correctly checksummed, and chunk sequences fed to the
assembler in any order. Each test runs for its share of FUZZ_SECONDS (see budget.py).

Pass criterion of every test: each input either decodes to a tensor whose dtype,
shape and size agree with its header and the raw-byte cap, or is refused with
FrameError; nothing else is raised, no example takes 5 s, and the process's peak
resident memory grows by less than 64 MiB over the whole run (a decoder that
allocated what a header claims would pass that at once)."""

from __future__ import annotations

import pytest
import torch
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from serve.comm.codecs import CodecSpec
from serve.comm.frames import (
    DTYPES,
    MAGIC,
    FrameAssembler,
    FrameError,
    decode_frame,
    encode_frame,
    iter_chunks,
    read_header,
)
from tests.fixtures.hostile_frames import seal, zstd_declaring
from tests.fuzz.budget import FUZZ, peak_rss_bytes, run_for, timeout_s

CAP = 1 << 20
RSS_GROWTH_LIMIT = 64 << 20
SPECS = ["none", "lossless", "int8", "int8+zstd", "fp8", "fp8+zstd3", "int4", "int4+zstd"]
SPECS += ["kmeans4"]
VALID = [
    encode_frame(torch.randn(3, 40).to(dtype), CodecSpec.parse(text))
    for text in SPECS
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
] + [encode_frame(torch.arange(24, dtype=dtype).reshape(2, 3, 4), CodecSpec("none"))
     for dtype in (torch.int64, torch.int8, torch.uint8)]  # fmt: skip


def decode_checked(data: bytes) -> None:
    """Decodes `data`; a result must agree with its header and the cap."""
    try:
        y = decode_frame(data, max_raw_nbytes=CAP)
    except FrameError:
        return
    header = read_header(data, CAP)
    assert y.dtype == DTYPES[header.dtype]
    assert tuple(y.shape) == header.shape
    assert y.numel() * y.element_size() == header.raw_nbytes <= CAP


@pytest.fixture(autouse=True)
def bounded_memory():
    before = peak_rss_bytes()
    yield
    assert peak_rss_bytes() - before < RSS_GROWTH_LIMIT


@pytest.mark.timeout(timeout_s("frames_bytes"))
def test_random_and_mutated_bytes() -> None:
    """Random bytes, random bytes after the magic, and valid frames with bytes
    flipped, cut or appended: refused (or, for random bytes, decoded consistently)."""

    @FUZZ
    @given(
        data=st.binary(max_size=512),
        frame=st.sampled_from(VALID),
        edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=4),
        cut=st.none() | st.integers(0, 1 << 16),
        extra=st.binary(max_size=8),
    )
    def search(data: bytes, frame: bytes, edits, cut, extra: bytes) -> None:
        decode_checked(data)
        decode_checked(MAGIC + data)
        decode_checked(MAGIC + b"\x01" + data)
        mutated = bytearray(frame)
        for pos, xor in edits:
            mutated[pos % len(mutated)] ^= xor
        if cut is not None:
            mutated = mutated[: cut % len(mutated)]
        mutated += extra
        if bytes(mutated) == frame:
            decode_checked(frame)
            return
        with pytest.raises(FrameError):
            decode_frame(bytes(mutated), max_raw_nbytes=CAP)

    run_for("frames_bytes", search)


def _streamed_zeros(nbytes: int) -> bytes:
    """A zstd frame of `nbytes` zeros without a content size, made 1 MiB at a time."""
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    block = bytes(1 << 20)
    parts = [cobj.compress(block[: min(1 << 20, nbytes - i)]) for i in range(0, nbytes, 1 << 20)]
    return b"".join(parts) + cobj.flush()


# Bombs, made once: 64 MiB of zeros in a few KiB, and frames declaring up to 4 GiB.
BOMBS = [_streamed_zeros(64 << 20)] + [zstd_declaring(n) for n in (1 << 30, 2**32 - 1, 16)]


def zstd_payloads() -> st.SearchStrategy[bytes]:
    """zstd frames with and without a content size, of random content, and bombs."""
    with_size = st.builds(
        lambda data, level: zstandard.ZstdCompressor(level=level).compress(data),
        st.binary(max_size=2048),
        st.integers(1, 3),
    )

    def streamed(data: bytes) -> bytes:
        cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
        return cobj.compress(data) + cobj.flush()

    return with_size | st.binary(max_size=2048).map(streamed) | st.sampled_from(BOMBS)


# Header fields a resealed frame may change, and the width of each (bits).
FIELD_BITS = {
    "codec": 8,
    "zstd_level": 8,
    "dtype": 8,
    "flags": 16,
    "block_size": 32,
    "chunk_index": 32,
    "raw_nbytes": 64,
    "payload_nbytes": 64,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    spec = CodecSpec.parse(draw(st.sampled_from(SPECS)))
    x = torch.randn(shape).to(dtype) if shape else torch.tensor(1.5, dtype=dtype)
    return encode_frame(x, spec)


def field_values() -> st.SearchStrategy[int]:
    return (
        st.integers(0, 8)
        | st.sampled_from([16, 32, 63, 64, 65, 128, 255, 1 << 16, 2**31, 2**32 - 1])
        | st.integers(0, 2**64 - 1)
    )


@pytest.mark.timeout(timeout_s("frames_resealed"))
def test_resealed_headers() -> None:
    """Valid frames with up to three header fields (or the dims) changed and both
    checksums made right again, with their payload kept, edited and resealed, or
    swapped for another (including zstd bombs: 64 MiB of zeros in a few KiB, frames
    declaring up to 4 GiB): they reach the deep checks, which refuse them or
    decode them consistently with their header."""
    dims = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2, 2**31, 2**62, 2**64 - 1])
    shapes = st.lists(st.integers(0, 80), max_size=3) | st.lists(dims, max_size=9)
    payloads = st.binary(max_size=600) | zstd_payloads() | st.sampled_from(VALID)

    @FUZZ
    @given(
        base=valid_frames(),
        changes=st.dictionaries(st.sampled_from(sorted(FIELD_BITS)), field_values(), max_size=3),
        shape=st.none() | shapes.map(tuple),
        payload=st.none() | payloads,
        payload_edit=st.none() | st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)),
    )
    def search(base: bytes, changes, shape, payload, payload_edit) -> None:
        h = read_header(base, CAP)
        fields = {
            "codec": h.codec,
            "zstd_level": h.zstd_level,
            "dtype": h.dtype,
            "flags": h.flags,
            "block_size": h.block_size,
            "chunk_index": h.chunk_index,
            "raw_nbytes": h.raw_nbytes,
            "payload_nbytes": None,
        }
        for name, value in changes.items():
            fields[name] = value & ((1 << FIELD_BITS[name]) - 1)
        body = bytearray(base[h.header_nbytes :] if payload is None else payload)
        if payload_edit is not None and body:
            body[payload_edit[0] % len(body)] ^= payload_edit[1]
        frame = seal(
            codec=fields["codec"],
            zstd_level=fields["zstd_level"],
            dtype=fields["dtype"],
            shape=h.shape if shape is None else shape,
            block_size=fields["block_size"],
            raw_nbytes=fields["raw_nbytes"],
            payload=bytes(body),
            flags=fields["flags"],
            chunk_index=fields["chunk_index"],
            payload_nbytes=fields["payload_nbytes"],
        )
        decode_checked(frame)

    run_for("frames_resealed", search)


@pytest.mark.timeout(timeout_s("frames_assembler"))
def test_assembler_with_chunks_in_any_order() -> None:
    """Chunked frames fed in order rebuild the tensor bit for bit (exact codecs); in
    another order, with chunks dropped, repeated or corrupted, or past the expected
    shape, the assembler refuses with FrameError."""
    source = torch.randn(12, 10)

    @FUZZ
    @given(
        spec=st.sampled_from(["none", "lossless", "int8+zstd", "int4"]),
        chunk_numel=st.integers(1, 130),
        order=st.permutations(range(16)),
        drop=st.sets(st.integers(0, 15), max_size=2),
        repeat=st.none() | st.integers(0, 15),
        flip=st.none() | st.tuples(st.integers(0, 15), st.integers(0, 1 << 12)),
        expected_rows=st.sampled_from([None, 12, 11, 13]),
    )
    def search(spec, chunk_numel, order, drop, repeat, flip, expected_rows) -> None:
        codec = CodecSpec.parse(spec)
        frames = list(iter_chunks(source, codec, chunk_numel))
        n = len(frames)
        picked = [i for i in order if i < n and i not in drop]
        if repeat is not None and repeat < n:
            picked.insert(min(repeat, len(picked)), repeat)
        sent = [bytearray(frames[i]) for i in picked]
        if flip is not None and flip[0] < len(sent):
            frame = sent[flip[0]]
            frame[flip[1] % len(frame)] ^= 0x5A
        expected = None if expected_rows is None else (expected_rows, 10)
        assembler = FrameAssembler(CAP, expected, torch.float32)
        intact = picked == list(range(n)) and flip is None and expected_rows in (None, 12)
        try:
            for frame in sent:
                if assembler.add(bytes(frame)):
                    break
            result = assembler.result()
        except FrameError:
            assert not intact, "an intact chunk sequence was refused"
            return
        assert result.shape == (12, 10)
        if intact and codec.is_exact:
            assert torch.equal(result, source)

    run_for("frames_assembler", search)
