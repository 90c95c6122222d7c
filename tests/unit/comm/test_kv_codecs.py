"""KV codecs: exact codecs round-trip bit for bit, lossy ones stay inside their
per-channel (keys) and per-token (values) error bounds, and per-channel keys beat
per-token keys on keys with outlier channels (KIVI's finding)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.comm import frames
from serve.comm.codecs import CodecError, CodecSpec
from serve.comm.frames import FrameError
from serve.comm.kv_codecs import (
    KEY_GROUP,
    KV_CODECS,
    KvCodec,
    KvGeometry,
    decode_kv,
    encode_kv,
    fp16_nbytes,
)

SCALE_SLACK = 1 + 2.0**-7  # scales are rounded up to bf16
QMAX = {"int8": 127.0, "int4": 7.0}


def kv_like(
    num_tokens: int, heads: int, dim: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a few outlier channels (as trained models have), plain values."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, heads, dim, generator=gen)
    outliers = torch.randint(0, dim, (max(1, dim // 16),), generator=gen)
    k[:, :, outliers] *= 20.0
    v = torch.randn(num_tokens, heads, dim, generator=gen)
    return k.to(dtype), v.to(dtype)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 80),
    heads=st.integers(1, 4),
    dim=st.sampled_from([8, 16, 32, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    name=st.sampled_from(["none", "lossless"]),
    seed=st.integers(0, 2**16),
)
def test_exact_codecs_are_bit_exact(tokens, heads, dim, dtype, name, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (2, tokens * heads * dim * dtype.itemsize), dtype=torch.uint8,
                        generator=gen)  # fmt: skip
    k = raw[0].view(dtype).view(tokens, heads, dim)  # NaN payloads, Inf, -0.0 included
    v = raw[1].view(dtype).view(tokens, heads, dim)
    kf, vf = encode_kv(k, v, KvCodec.parse(name))
    k2, v2 = decode_kv(kf, vf, tokens, KvGeometry(heads, dim, dtype))
    assert torch.equal(_bits(k2), _bits(k)) and torch.equal(_bits(v2), _bits(v))


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.one_of(st.integers(1, KEY_GROUP), st.sampled_from([2 * KEY_GROUP, 4 * KEY_GROUP])),
    heads=st.integers(1, 4),
    dim=st.sampled_from([8, 24, 32, 64]),
    name=st.sampled_from(["int8", "int4", "int8+zstd", "int4+zstd"]),
    seed=st.integers(0, 2**16),
)
def test_lossy_codecs_keep_per_channel_and_per_token_bounds(tokens, heads, dim, name, seed) -> None:
    k, v = kv_like(tokens, heads, dim, seed)
    codec = KvCodec.parse(name)
    kf, vf = encode_kv(k, v, codec)
    k2, v2 = decode_kv(kf, vf, tokens, KvGeometry(heads, dim, torch.float32))
    qmax = QMAX[codec.spec.name]
    # Keys: one scale per (head, dim) channel over each group of KEY_GROUP tokens.
    group = min(tokens, KEY_GROUP)
    by_group = k.view(tokens // group, group, heads, dim)
    channel_max = by_group.abs().amax(dim=1, keepdim=True).expand_as(by_group).reshape_as(k)
    assert ((k2 - k).abs() <= channel_max / qmax / 2 * SCALE_SLACK + 1e-30).all()
    # Values: one scale per group of channels of one token.
    block = codec.value_block(heads * dim)
    rows = v.reshape(tokens, -1, block)
    group_max = rows.abs().amax(dim=2, keepdim=True).expand_as(rows).reshape_as(v)
    assert ((v2 - v).abs() <= group_max / qmax / 2 * SCALE_SLACK + 1e-30).all()


def test_per_channel_keys_beat_per_token_keys_on_outlier_channels() -> None:
    k, _ = kv_like(64, 4, 64, seed=3)
    codec = KvCodec.parse("int4")
    kf, vf = encode_kv(k, k, codec)
    per_channel, _ = decode_kv(kf, vf, 64, KvGeometry(4, 64, torch.float32))
    # The same bytes spent per token (one scale per 32 channels of a token).
    per_token = frames.decode_frame(frames.encode_frame(k.reshape(64, -1), CodecSpec("int4")))
    err_channel = (per_channel - k).norm() / k.norm()
    err_token = (per_token.view_as(k) - k).norm() / k.norm()
    assert err_channel < 0.8 * err_token, (err_channel, err_token)


def test_int4_zstd_is_under_three_tenths_of_fp16() -> None:
    k, v = kv_like(64, 4, 64, seed=5)
    kf, vf = encode_kv(k, v, KvCodec.parse("int4+zstd"))
    ratio = (len(kf) + len(vf)) / fp16_nbytes(64, 1, KvGeometry(4, 64, torch.float32))
    assert ratio <= 0.30, ratio


def test_decoder_refuses_frames_of_another_geometry() -> None:
    k, v = kv_like(16, 2, 32, seed=1)
    for name in ("none", "int8"):
        kf, vf = encode_kv(k, v, KvCodec.parse(name))
        with pytest.raises(FrameError):
            decode_kv(kf, vf, 17, KvGeometry(2, 32, torch.float32))
        with pytest.raises(FrameError):
            decode_kv(kf, vf, 16, KvGeometry(2, 16, torch.float32))
        with pytest.raises(FrameError):
            decode_kv(kf, vf, 16, KvGeometry(2, 32, torch.float16))
    bad = bytearray(encode_kv(k, v, KvCodec.parse("lossless"))[0])
    bad[-1] ^= 1
    with pytest.raises(FrameError):
        decode_kv(bytes(bad), bytes(bad), 16, KvGeometry(2, 32, torch.float32))


def test_codec_names() -> None:
    for name in KV_CODECS:
        assert KvCodec.parse(name).label == name
    assert KvCodec.parse("lossless").is_exact and not KvCodec.parse("int4").is_exact
    with pytest.raises(CodecError):
        KvCodec.parse("kmeans4")
    with pytest.raises(CodecError):
        encode_kv(*kv_like(KEY_GROUP + 1, 1, 8, seed=0), KvCodec.parse("int8"))


def _generic_key_frame(k: torch.Tensor, codec: KvCodec) -> bytes:
    """The key frame as the blockwise codec writes it for the transposed keys."""
    tokens, heads, dim = k.shape
    group = min(tokens, KEY_GROUP)
    spec = CodecSpec(codec.spec.name, codec.spec.zstd_level, group)
    kt = k.reshape(tokens // group, group, heads, dim).permute(0, 2, 3, 1).reshape(-1, group)
    return frames.encode_frame(kt, spec)


@settings(max_examples=80, deadline=None)
@given(
    tokens=st.one_of(st.integers(1, KEY_GROUP), st.sampled_from([2 * KEY_GROUP, 3 * KEY_GROUP])),
    heads=st.integers(1, 3),
    dim=st.sampled_from([7, 8, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    name=st.sampled_from(["int8", "int4", "int8+zstd", "int4+zstd", "fp8"]),
    special=st.sampled_from(["", "nan", "inf", "zeros", "fp16 max"]),
    seed=st.integers(0, 2**16),
)
def test_keys_take_the_transposed_layout_byte_for_byte(
    tokens, heads, dim, dtype, name, special, seed
) -> None:
    """Keys are quantized per channel without transposing the floats: the frame is
    the blockwise codec's frame of the transposed keys, byte for byte, and decodes
    to the same bits (non-finite values and scales past fp16 fall back to it)."""
    k, v = kv_like(tokens, heads, dim, seed, dtype)
    if special == "nan":
        k[tokens // 2, 0, dim - 1] = float("nan")
    elif special == "inf":
        k[0, heads - 1, 0] = float("-inf")
    elif special == "zeros":
        k[:, 0] = 0.0
        k[:, -1] = -0.0
    elif special == "fp16 max":
        k[0, 0, 0] = torch.finfo(dtype).max
    codec = KvCodec.parse(name)
    kf, vf = encode_kv(k, v, codec)
    generic = _generic_key_frame(k, codec)
    assert kf == generic
    k2, _ = decode_kv(kf, vf, tokens, KvGeometry(heads, dim, dtype))
    group = min(tokens, KEY_GROUP)
    shape = (tokens // group * heads * dim, group)
    k3 = frames.decode_frame(generic, expected_shape=shape, expected_dtype=dtype)
    k3 = k3.view(tokens // group, heads, dim, group).permute(0, 3, 1, 2).reshape_as(k)
    assert torch.equal(_bits(k2), _bits(k3))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_hostile_key_scales_decode_as_the_blockwise_codec_does(name: str) -> None:
    """A key frame (checksums intact) whose scales hold a NaN and a value past fp16's
    range decodes to the same bits as through the blockwise codec: NaN where the
    scale is NaN, the rest clamped to fp16's finite range."""
    tokens, heads, dim = 64, 2, 8
    k, v = kv_like(tokens, heads, dim, seed=7, dtype=torch.float16)
    kf, vf = encode_kv(k, v, KvCodec.parse(name))
    shape = (heads * dim, tokens)  # one key group: [channels, tokens]
    header = frames.read_header(kf, 1 << 20)
    inner = frames.frame_inner(kf, header, shape, torch.float16)
    scales = inner[: 2 * heads * dim].view(torch.bfloat16)
    scales[0] = float("nan")
    scales[1] = 1e6
    hostile = b"".join(frames.inner_frame_pieces(inner, torch.float16, shape, header.spec))
    k2, _ = decode_kv(hostile, vf, tokens, KvGeometry(heads, dim, torch.float16))
    k3 = frames.decode_frame(hostile, expected_shape=shape, expected_dtype=torch.float16)
    k3 = k3.view(1, heads, dim, tokens).permute(0, 3, 1, 2).reshape_as(k)
    assert torch.equal(_bits(k2), _bits(k3))
    assert k2[:, 0, 0].isnan().all() and k2.isfinite()[:, 0, 2:].all()
