"""KV-cache codecs: how one layer's keys and values for a run of tokens travel.

Keys and values are quantized along different axes (KIVI, Liu et al. 2024): keys
have outlier *channels* (a few head dimensions are large for every token), so a
key scale covers one channel over the chunk's tokens; values have no such
structure and their error mixes across channels in the attention output, so a
value scale covers a group of channels of one token. Both reuse the blockwise
codecs of `serve.comm.codecs`; only the layout fed to them differs:

    keys    lossy: [groups * kv_heads * head_dim, group], block = group: one scale
                   per channel and group of KEY_GROUP tokens (a chunk of at most
                   KEY_GROUP tokens is one group; a longer one must be a multiple)
            exact: [num_tokens, kv_heads, head_dim] as they are
    values  lossy: [num_tokens, kv_heads * head_dim], block = the codec's group,
                   cut to divide kv_heads * head_dim (a block never spans two tokens)
            exact: [num_tokens, kv_heads, head_dim] as they are

Each travels as one checked frame (`serve.comm.frames`), whose header names the
codec, dtype, shape and block size, so a decoder needs no side information
beyond the expected geometry. `none` and `lossless` are bit-exact. The key
layout is what the frame holds; int8/int4 keys are coded from the tokens as they
lie (`codecs.encode_along`: scales reduced along the token axis, only the
one-byte codes transposed), byte for byte the same frame without a float transpose.

Wire size against fp16 (2 bytes per element) with int4 (key groups of 64 tokens,
value groups of 32 channels): keys 0.531 B + values 0.5625 B per element, i.e.
0.273x before zstd; `+zstd` shaves a little more.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from serve.comm import codecs, frames
from serve.comm.codecs import BLOCK_LABELS, CodecError, CodecSpec

logger = logging.getLogger(__name__)

# Codecs a KV move may use (kmeans4 fits one codebook per tensor: no per-channel scales).
KV_CODECS: tuple[str, ...] = BLOCK_LABELS
# Tokens one key scale covers (a shorter chunk: all of its tokens).
KEY_GROUP = 64
FP16_ITEMSIZE = 2


@dataclass(frozen=True)
class KvCodec:
    """A KV codec: the activation codec applied per channel to keys and per token to
    values. Parse from `none`, `lossless`, `int8`, `int4+zstd`, ...; `value_group`
    0 takes the codec's block size."""

    spec: CodecSpec
    value_group: int = 0

    @classmethod
    def parse(cls, text: str, zstd_level: int = 1, value_group: int = 0) -> KvCodec:
        spec = CodecSpec.parse(text, zstd_level=zstd_level)
        if spec.name == "kmeans4":
            raise CodecError("kmeans4 cannot code KV (no per-channel scales); use int4")
        return cls(spec, value_group)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def is_exact(self) -> bool:
        return self.spec.is_exact

    def value_block(self, row_numel: int) -> int:
        """Block size of the value frame: the group cut to divide a token's row."""
        group = self.value_group or self.spec.block_size
        return math.gcd(row_numel, group) if row_numel else group


# Cache dtypes a KV stream may carry, by name.
KV_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class KvGeometry:
    """What a receiver expects of every chunk: heads, head size and dtype."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def named(cls, num_kv_heads: int, head_dim: int, dtype: str) -> KvGeometry:
        if dtype not in KV_DTYPES:
            raise CodecError(f"KV dtype {dtype!r} is not one of {tuple(KV_DTYPES)}")
        return cls(num_kv_heads, head_dim, KV_DTYPES[dtype])

    @property
    def row_numel(self) -> int:
        return self.num_kv_heads * self.head_dim


def encode_kv(
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    codec: KvCodec,
) -> tuple[bytes, bytes]:
    """The key frame and the value frame of one layer's chunk."""
    key, value = encode_kv_pieces(k, v, codec)
    return b"".join(key), b"".join(value)


def encode_kv_pieces(
    k: torch.Tensor, v: torch.Tensor, codec: KvCodec
) -> tuple[frames.FramePieces, frames.FramePieces]:
    """encode_kv with each frame as its header and payload (frames.FramePieces), for a
    writer that copies them into its message once."""
    if k.shape != v.shape or k.dim() != 3:
        raise CodecError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} must be [T, H, D]")
    spec = codec.spec
    if spec.is_exact:
        return frames.encode_frame_pieces(k, spec), frames.encode_frame_pieces(v, spec)
    num_tokens, heads, dim = k.shape
    group = key_group(num_tokens)
    key_spec = CodecSpec(spec.name, spec.zstd_level, group)
    kg = k.reshape(num_tokens // group, group, heads * dim)  # [groups, group, channels]
    key_shape = (num_tokens // group * heads * dim, group)
    inner = codecs.encode_along(kg, key_spec)  # the transpose's payload, from kg as it lies
    if inner is not None:
        key = frames.inner_frame_pieces(inner, k.dtype, key_shape, key_spec)
    else:
        key = frames.encode_frame_pieces(kg.transpose(1, 2).reshape(key_shape), key_spec)
    value_spec = CodecSpec(spec.name, spec.zstd_level, codec.value_block(heads * dim))
    vt = v.reshape(num_tokens, heads * dim)  # [T, channels]
    return key, frames.encode_frame_pieces(vt, value_spec)


def decode_kv(
    key_frame: bytes | memoryview,
    value_frame: bytes | memoryview,
    num_tokens: int,
    geometry: KvGeometry,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [num_tokens, kv_heads, head_dim] back from their frames; any
    mismatch with the expected geometry raises FrameError before allocating."""
    heads, dim = geometry.num_kv_heads, geometry.head_dim
    max_raw = num_tokens * heads * dim * geometry.dtype.itemsize
    k = _decode_one(key_frame, num_tokens, geometry, max_raw, keys=True)
    v = _decode_one(value_frame, num_tokens, geometry, max_raw, keys=False)
    return k, v


def _decode_one(
    data: bytes | memoryview, num_tokens: int, g: KvGeometry, max_raw: int, *, keys: bool
) -> torch.Tensor:
    header = frames.read_header(data, max(max_raw, 1))
    exact = header.spec.is_exact
    if exact:
        shape: tuple[int, ...] = (num_tokens, g.num_kv_heads, g.head_dim)
    elif keys:
        group = key_group(num_tokens)
        shape = (num_tokens // group * g.row_numel, group)
    else:
        shape = (num_tokens, g.row_numel)
    if keys and not exact:
        groups = num_tokens // group
        inner = frames.frame_inner(data, header, shape, g.dtype)
        # The codes are transposed back, not the floats (codecs.decode_along).
        x = codecs.decode_along(inner, g.dtype, (groups, group, g.row_numel), header.spec)
        if x is None:
            x = codecs.decode_inner(inner, g.dtype, shape, header.spec)
            x = x.view(groups, g.row_numel, group).transpose(1, 2)
        return x.reshape(num_tokens, g.num_kv_heads, g.head_dim)
    x = frames.decode_frame(data, max(max_raw, 1), shape, g.dtype)
    return x.view(num_tokens, g.num_kv_heads, g.head_dim)


def key_group(num_tokens: int) -> int:
    """Tokens per key scale in a chunk of num_tokens (see the module docstring)."""
    if num_tokens <= KEY_GROUP:
        return max(num_tokens, 1)
    if num_tokens % KEY_GROUP:
        raise CodecError(
            f"a chunk of more than {KEY_GROUP} tokens must be a multiple of it, got {num_tokens}"
        )
    return KEY_GROUP


def measure_kv_codec(
    codec: KvCodec, geometry: KvGeometry, num_tokens: int
) -> tuple[float, float, float]:
    """(seconds per element to encode, to decode, wire bytes per raw byte) of one
    chunk of num_tokens tokens of Gaussian keys and values."""
    gen = torch.Generator().manual_seed(0)
    shape = (num_tokens, geometry.num_kv_heads, geometry.head_dim)
    k = torch.randn(shape, generator=gen).to(geometry.dtype)  # [T, kv_heads, head_dim]
    v = torch.randn(shape, generator=gen).to(geometry.dtype)
    start = time.perf_counter()
    kf, vf = encode_kv(k, v, codec)
    mid = time.perf_counter()
    decode_kv(kf, vf, num_tokens, geometry)
    end = time.perf_counter()
    numel = 2 * k.numel()
    ratio = (len(kf) + len(vf)) / (numel * k.element_size())
    return (mid - start) / numel, (end - mid) / numel, ratio


def fp16_nbytes(num_tokens: int, num_layers: int, geometry: KvGeometry) -> int:
    """Bytes the same KV would take as fp16 (the reference of the wire ratios)."""
    return 2 * num_layers * num_tokens * geometry.row_numel * FP16_ITEMSIZE
