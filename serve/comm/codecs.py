"""Tensor codecs for the traffic between shards: activations and KV cache.

A codec turns a tensor into a payload (a flat byte sequence) and back. Every codec
is a pure function of the tensor, vectorised torch with no Python loop over
elements or blocks, so the same code runs on CPU and GPU; only the optional zstd
stage moves bytes to the CPU.

Names (`CodecSpec.parse` text): `none`, `lossless`, `int8`, `fp8`, `int4`,
`kmeans4`; a lossy one may take `+zstd` (`int8+zstd`, or `int8+zstd3` for a level).

Payload layouts, little-endian; n = numel, B = block size, nb = ceil(n / B):

    none      the element bytes as they are                       n * itemsize
    lossless  zstd frame of the byte planes: plane 0 holds the most significant
              byte of every element, the last plane the least significant one
              (sign and exponent bytes compress well when grouped); bit-exact
    int8      [nb bf16 scales | n int8 codes]                     2*nb + n
              code = round(x / scale) in [-127, 127]; -128 marks a non-finite x
    fp8       [nb bf16 scales | n float8_e4m3fn bytes]            2*nb + n
              byte = e4m3(x / scale), |x / scale| <= 448; e4m3 NaN marks non-finite
    int4      [nb bf16 scales | ceil(n/2) bytes]                  2*nb + ceil(n/2)
              nibble = code + 8, code = round(x / scale) in [-7, 7]; element 2i in
              the low nibble, 2i+1 in the high one; nibble 0 (code -8) = non-finite
    kmeans4   [16 fp32 centroids, ascending | ceil(n/2) bytes of 4-bit indices,
              packed as int4]                                      64 + ceil(n/2)
    +zstd     one zstd frame (content size written) of the layout above

Block scales are absmax / qmax (qmax 127, 448, 7) rounded *up* to a bfloat16
value: the same two bytes as fp16, but fp32's exponent range, so a 1e6 or 1e38
outlier neither overflows its scale nor does a tiny block underflow it, and
rounding up keeps every code inside [-qmax, qmax]. Blocks run over the flattened
tensor; the last one is zero-padded before quantization and the padding is not
sent. int8 and fp8 default to B = 64 (wire size vs bf16 0.516), int4 to B = 32
(0.281; 0.266 at B = 64).

Defined behaviour:
- Non-finite values (NaN, +-Inf) survive only in `none` and `lossless` (bit-exact,
  payloads of -0.0, denormals and NaN bit patterns included). Lossy codecs decode
  each non-finite element as NaN, element by element: the block scale is taken
  over the finite values, so the rest of the block keeps its accuracy. (kmeans4
  spends its 16th centroid on NaN when the tensor has a non-finite value.)
- An all-zero block has scale 0 and decodes to zeros (never NaN).
- An outlier only coarsens its own block (absmax scale).
- Decoded finite values are clamped to the original dtype's finite range, so
  rounding a scale up never turns a near-max fp16 value into Inf.
- Empty and 0-d tensors round-trip with their shape.
- Error bounds (per element, finite x): int8 <= scale/2 ~ absmax_block/254;
  int4 <= scale/2 ~ absmax_group/14; fp8 <= 2^-4 |x| + 2^-10 * scale (3 mantissa
  bits; the second term below e4m3's normal range); kmeans4 <= max(x) - min(x).
  (The scale exceeds absmax/qmax by < 2^-7 relative from the bf16 round-up.)

kmeans4: not recommended (kept as an option). Relative MSE vs int4 at group 128
(3% more bytes): `small` preset down_proj 9.9e-3 vs 1.4e-2 (wins on near-Gaussian
values), o_proj 2.6e-2 vs 1.4e-2, Student-t with outlier channels (256 x 4096)
6.3e-1 vs 3.2e-2 (loses: one codebook per tensor cannot follow outliers); encode
6-20x slower on CPU (13.7 ms vs 0.8 ms for 256 x 896 bf16). From
`shardwire bench codecs --preset small`.

Errors: a bad spec, an unsupported dtype or a payload of the wrong size raises
`CodecError` (an `InvalidArgument`).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from dataclasses import dataclass

import torch
import zstandard

from serve.errors import InvalidArgument

logger = logging.getLogger(__name__)

if sys.byteorder != "little":  # payloads are raw tensor memory, defined little-endian
    raise ImportError("shardwire codecs need a little-endian host")

CODECS: tuple[str, ...] = ("none", "lossless", "int8", "fp8", "int4", "kmeans4")
LOSSLESS: frozenset[str] = frozenset({"none", "lossless"})
LOSSY: frozenset[str] = frozenset(CODECS) - LOSSLESS
# Every label but the codebook codec's: the exact codecs, then each blockwise lossy
# codec bare and with zstd. What `auto` chooses from and what KV moves may use.
BLOCK_LABELS: tuple[str, ...] = (
    "none",
    "lossless",
    *(f"{name}{zstd}" for name in ("int8", "fp8", "int4") for zstd in ("", "+zstd")),
)

# Float dtypes every codec takes; the exact codecs also carry integer tensors.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
EXACT_DTYPES: tuple[torch.dtype, ...] = FLOAT_DTYPES + (
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)

DEFAULT_BLOCK_SIZE = 64
DEFAULT_INT4_GROUP = 32
MAX_BLOCK_SIZE = 1 << 16
MAX_ZSTD_LEVEL = 22
DEFAULT_ZSTD_LEVEL = 1

SCALE_BYTES = 2  # bfloat16
INT8_QMAX = 127.0
INT4_QMAX = 7.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
KMEANS_CLUSTERS = 16
KMEANS_ITERS = 40
KMEANS_FIT_SAMPLES = 1 << 15  # Lloyd runs on a strided sample of at most this many values
CENTROID_BYTES = KMEANS_CLUSTERS * 4  # fp32


class CodecError(InvalidArgument):
    """A codec spec, dtype or payload that cannot be encoded or decoded."""


@dataclass(frozen=True)
class CodecSpec:
    """A codec and its parameters.

    `zstd_level` 0 means no zstd stage; `lossless` always has one (0 becomes 1).
    `block_size` is the quantization block of int8/fp8 (default 64) and the group
    of int4 (default 32); 0 picks the default; codecs without blocks normalise it to
    64. Equal specs compare equal after this normalisation.
    """

    name: str
    zstd_level: int = 0
    block_size: int = 0  # 0: the codec's default

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"unknown codec {self.name!r}; expected one of {', '.join(CODECS)}")
        level = self.zstd_level
        if not isinstance(level, int) or isinstance(level, bool):
            raise CodecError(f"zstd_level must be an int, got {level!r}")
        if not 0 <= level <= MAX_ZSTD_LEVEL:
            raise CodecError(f"zstd_level must be in 0..{MAX_ZSTD_LEVEL}, got {level}")
        if self.name == "none" and level:
            raise CodecError("codec 'none' has no zstd stage; use 'lossless'")
        if self.name == "lossless" and not level:
            level = DEFAULT_ZSTD_LEVEL
        block = self.block_size
        if not isinstance(block, int) or isinstance(block, bool):
            raise CodecError(f"block_size must be an int, got {block!r}")
        if self.name in ("int8", "fp8"):
            block = block or DEFAULT_BLOCK_SIZE
        elif self.name == "int4":
            block = block or DEFAULT_INT4_GROUP
        else:
            block = DEFAULT_BLOCK_SIZE
        if not 1 <= block <= MAX_BLOCK_SIZE:
            raise CodecError(f"block_size must be in 1..{MAX_BLOCK_SIZE}, got {block}")
        object.__setattr__(self, "zstd_level", level)
        object.__setattr__(self, "block_size", block)

    @classmethod
    def parse(cls, text: str, zstd_level: int = 1, block_size: int = 0) -> CodecSpec:
        """`int8` -> CodecSpec("int8"); `int8+zstd` -> CodecSpec("int8", zstd_level);
        `int8+zstd3` -> level 3; `lossless` uses zstd_level."""
        base, plus, suffix = text.strip().lower().partition("+")
        if base not in CODECS:
            raise CodecError(f"unknown codec {text!r}; expected one of {', '.join(CODECS)}")
        level = 0
        if plus:
            if base not in LOSSY or not suffix.startswith("zstd"):
                raise CodecError(f"bad codec {text!r}: only a lossy codec takes '+zstd'")
            digits = suffix[len("zstd") :]
            if digits and not digits.isdigit():
                raise CodecError(f"bad zstd level in {text!r}")
            level = int(digits) if digits else zstd_level
            if level < 1:
                raise CodecError(f"bad codec {text!r}: '+zstd' needs a level >= 1")
        elif base == "lossless":
            level = zstd_level
        return cls(base, level, block_size)

    @property
    def is_exact(self) -> bool:
        """Bit-exact round trip."""
        return self.name in LOSSLESS

    @property
    def has_zstd(self) -> bool:
        return self.zstd_level > 0

    @property
    def label(self) -> str:
        """Short text that `parse` reads back (with the same level and block size)."""
        return f"{self.name}+zstd" if self.name in LOSSY and self.has_zstd else self.name


@dataclass(frozen=True)
class Encoded:
    """An encoded tensor. `payload` is a flat uint8 tensor on the source device when
    the codec has no zstd stage (for `none` it aliases the source memory), else the
    zstd frame as bytes."""

    spec: CodecSpec
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: bytes | torch.Tensor
    raw_nbytes: int

    @property
    def nbytes(self) -> int:
        """Bytes on the wire."""
        if isinstance(self.payload, torch.Tensor):
            return self.payload.numel()
        return len(self.payload)

    @property
    def ratio(self) -> float:
        """Wire bytes / raw bytes."""
        return self.nbytes / self.raw_nbytes if self.raw_nbytes else 1.0


# --- sizes ---------------------------------------------------------------------------------


def check_dtype(dtype: torch.dtype, spec: CodecSpec) -> None:
    allowed = EXACT_DTYPES if spec.is_exact else FLOAT_DTYPES
    if dtype not in allowed:
        raise CodecError(f"codec {spec.name!r} does not take dtype {dtype}")


def inner_nbytes(numel: int, dtype: torch.dtype, spec: CodecSpec) -> int:
    """Exact size of the codec's layout before any zstd stage."""
    check_dtype(dtype, spec)
    if numel < 0:
        raise CodecError(f"negative numel {numel}")
    blocks = -(-numel // spec.block_size)
    if spec.name in LOSSLESS:
        return numel * dtype.itemsize
    if spec.name in ("int8", "fp8"):
        return SCALE_BYTES * blocks + numel
    if spec.name == "int4":
        return SCALE_BYTES * blocks + (numel + 1) // 2
    return CENTROID_BYTES + (numel + 1) // 2  # kmeans4


def zstd_bound(nbytes: int) -> int:
    """Largest zstd frame a single-shot compression of `nbytes` can produce."""
    margin = ((128 << 10) - nbytes) >> 11 if nbytes < (128 << 10) else 0
    return nbytes + (nbytes >> 8) + margin


def max_encoded_nbytes(numel: int, dtype: torch.dtype, spec: CodecSpec) -> int:
    """Upper bound of the payload size, for preallocation; exact without zstd."""
    inner = inner_nbytes(numel, dtype, spec)
    return zstd_bound(inner) if spec.has_zstd else inner


# --- zstd stage ----------------------------------------------------------------------------

_local = threading.local()  # zstd contexts are not thread-safe: one set per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "decompressor", None)
    if dctx is None:
        dctx = _local.decompressor = zstandard.ZstdDecompressor()
    return dctx


def zstd_compress(data: torch.Tensor, level: int) -> bytes:
    """One zstd frame, with its content size, of a flat uint8 tensor."""
    return _compressor(level).compress(data.detach().cpu().contiguous().numpy())


def zstd_decompress(data: bytes | bytearray | memoryview, expected_nbytes: int) -> bytes:
    """Decompresses one zstd frame that must hold exactly `expected_nbytes` bytes.

    No more than `expected_nbytes` is ever allocated: a declared content size is read
    from the frame header first and refused unless it equals the expected size (the
    decompressor would otherwise allocate whatever the frame declares); a frame
    without one is decompressed with `max_output_size` = expected size."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"not a zstd frame: {exc}") from None
    if declared != -1 and declared != expected_nbytes:
        raise CodecError(
            f"zstd frame declares {declared} bytes, expected exactly {expected_nbytes}"
        )
    try:
        out = _decompressor().decompress(
            data, max_output_size=max(expected_nbytes, 1), allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CodecError(
            f"bad zstd frame (or more than the expected {expected_nbytes} bytes): {exc}"
        ) from None
    if len(out) != expected_nbytes:
        raise CodecError(f"zstd frame holds {len(out)} bytes, expected {expected_nbytes}")
    return out


def bytes_to_uint8(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """A flat uint8 CPU tensor holding a copy of `data` (writable, owned)."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# --- public API ----------------------------------------------------------------------------


def encode(x: torch.Tensor, spec: CodecSpec) -> Encoded:
    """Encodes `x` (any shape, contiguous or not) with `spec`."""
    check_dtype(x.dtype, spec)
    x = x.detach()
    return encoded(_encode_inner(x, spec), x.dtype, tuple(x.shape), spec)


def encoded(
    inner: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], spec: CodecSpec
) -> Encoded:
    """An Encoded from the payload before the zstd stage (a flat uint8 tensor) of a
    tensor of this dtype and shape; the zstd stage is applied here."""
    payload: bytes | torch.Tensor = (
        zstd_compress(inner, spec.zstd_level) if spec.has_zstd else inner
    )
    return Encoded(spec, dtype, shape, payload, math.prod(shape) * dtype.itemsize)


def decode(enc: Encoded) -> torch.Tensor:
    """The tensor back, same dtype and shape; on the payload's device (CPU for zstd)."""
    if isinstance(enc.payload, torch.Tensor):
        return decode_from_uint8(enc.payload, enc.dtype, enc.shape, enc.spec)
    return decode_bytes(enc.payload, enc.dtype, enc.shape, enc.spec)


def encode_to_uint8(x: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    """The payload as a flat uint8 tensor on x's device. Without zstd it never leaves
    the device (for `none` it is a view of x's memory: do not modify x until it is
    sent); with zstd the frame is copied back to the device."""
    enc = encode(x, spec)
    if isinstance(enc.payload, torch.Tensor):
        return enc.payload
    return bytes_to_uint8(enc.payload).to(x.device)


def decode_from_uint8(
    buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size, spec: CodecSpec
) -> torch.Tensor:
    """Decodes a flat uint8 payload (any device; the result is on the same device).
    A payload of the wrong size raises CodecError."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CodecError(f"payload must be a flat uint8 tensor, got {buf.dtype} {tuple(buf.shape)}")
    if spec.has_zstd:
        raw = zstd_decompress(
            memoryview(buf.cpu().contiguous().numpy()), _expected(dtype, shape, spec)
        )
        owned = bytes_to_uint8(raw).to(buf.device)
        return _decode_inner(owned, dtype, tuple(shape), spec, owned=True)
    return _decode_inner(buf, dtype, tuple(shape), spec)


def decode_bytes(
    data: bytes | bytearray | memoryview,
    dtype: torch.dtype,
    shape: tuple[int, ...] | torch.Size,
    spec: CodecSpec,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Decodes a payload held in host memory, onto `device`."""
    owned = inner_of(data, dtype, shape, spec).to(device)
    return _decode_inner(owned, dtype, tuple(shape), spec, owned=True)


def inner_of(
    data: bytes | bytearray | memoryview,
    dtype: torch.dtype,
    shape: tuple[int, ...] | torch.Size,
    spec: CodecSpec,
) -> torch.Tensor:
    """The payload before the zstd stage, as a fresh flat uint8 CPU tensor; a payload
    of the wrong size raises CodecError."""
    expected = _expected(dtype, shape, spec)
    if spec.has_zstd:
        data = zstd_decompress(data, expected)
    elif len(data) != expected:
        raise CodecError(f"{spec.name} payload is {len(data)} bytes, expected {expected}")
    return bytes_to_uint8(data)  # a fresh copy of data


def _expected(dtype: torch.dtype, shape: tuple[int, ...] | torch.Size, spec: CodecSpec) -> int:
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {tuple(shape)}")
    return inner_nbytes(math.prod(shape), dtype, spec)


# --- the codecs ----------------------------------------------------------------------------


def _encode_inner(x: torch.Tensor, spec: CodecSpec) -> torch.Tensor:
    flat = x.contiguous().reshape(-1)  # [n]
    if spec.name == "none":
        return flat.view(torch.uint8)
    if spec.name == "lossless":
        return _shuffle(flat)
    if spec.name == "kmeans4":
        return _kmeans4_encode(flat.float())
    blocks = _blockify(flat.float(), spec.block_size)  # [nb, B]
    qmax = {"int8": INT8_QMAX, "fp8": FP8_MAX, "int4": INT4_QMAX}[spec.name]
    n = flat.numel()
    if spec.name != "fp8" and blocks.device.type == "cpu":  # it reads a flag back: no GPU sync
        fast = _encode_finite_ints(blocks[:, :, None], qmax, n, spec.name)
        if fast is not None:
            return fast
    finite = torch.isfinite(blocks)
    scale = _block_scales(blocks, finite, qmax)  # [nb], bf16-exact float32
    y = blocks / torch.where(scale > 0, scale, 1.0)[:, None]  # [nb, B], |y| <= qmax
    if spec.name == "int8":
        codes = torch.where(finite, y.round().clamp(-INT8_QMAX, INT8_QMAX), -128.0)
        body = codes.to(torch.int8).reshape(-1)[:n].view(torch.uint8)
    elif spec.name == "fp8":
        y = torch.where(finite, y.clamp(-FP8_MAX, FP8_MAX), math.nan)
        body = y.to(torch.float8_e4m3fn).reshape(-1)[:n].view(torch.uint8)
    else:  # int4
        codes = torch.where(finite, y.round().clamp(-INT4_QMAX, INT4_QMAX), -8.0)
        body = _pack_nibbles((codes + 8).to(torch.uint8).reshape(-1)[:n])
    return torch.cat([scale.to(torch.bfloat16).view(torch.uint8), body])


def _encode_finite_ints(x: torch.Tensor, qmax: float, n: int, name: str) -> torch.Tensor | None:
    """int8 / int4 payload of x [G, B, C] whose values are all finite (None otherwise):
    the blocks run along dim 1 (one per g and c), scales come in [G, C] order and
    the first n codes of x.transpose(1, 2) follow. Byte for byte what the general
    path writes for that transpose, in fewer passes over memory: one min/max pass
    finds the scales and shows whether anything is non-finite (NaN and inf reach a
    block's min or max), no clamp is needed because every scale is rounded up
    (|y| <= qmax, so round(y) is within the codes), and only the one-byte codes
    are transposed, never the floats."""
    # amin and amax apart: two vectorised passes, 4x faster on CPU than aminmax's one.
    low, high = x.amin(dim=1), x.amax(dim=1)  # [G, C]
    absmax = torch.maximum(-low, high) + 0.0  # + 0.0: a -0.0 (all-zero block) becomes +0.0
    if not bool(torch.isfinite(absmax).all()):
        return None
    scale = _round_up_to_bf16(absmax / qmax)  # [G, C], bf16-exact float32
    y = x / torch.where(scale > 0, scale, 1.0)[:, None, :]  # [G, B, C]
    y.round_()
    if name == "int8":
        body = y.to(torch.int8).transpose(1, 2).reshape(-1)[:n].view(torch.uint8)
    else:
        y += 8.0
        body = _pack_nibbles(y.to(torch.uint8).transpose(1, 2).reshape(-1)[:n])
    return torch.cat([scale.reshape(-1).to(torch.bfloat16).view(torch.uint8), body])


def encode_along(x: torch.Tensor, spec: CodecSpec) -> torch.Tensor | None:
    """The int8 / int4 payload (before zstd) of `x.transpose(1, 2)` ([G, C, B], whose
    rows of B are the blocks: spec.block_size must be B) from x [G, B, C] as it lies,
    byte for byte what `encode` writes for that transpose, without transposing the
    floats (see _encode_finite_ints). None (use `encode`) for other codecs, devices
    or a non-finite value."""
    check_dtype(x.dtype, spec)
    num_groups, block, channels = x.shape
    if spec.name not in ("int8", "int4") or spec.block_size != block or x.device.type != "cpu":
        return None
    qmax = INT8_QMAX if spec.name == "int8" else INT4_QMAX
    return _encode_finite_ints(x.detach().float(), qmax, x.numel(), spec.name)


def decode_along(
    inner: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int, int], spec: CodecSpec
) -> torch.Tensor | None:
    """Inverse of `encode_along`: x [G, B, C] from the payload (before zstd) of its
    transpose [G, C, B], transposing only the one-byte codes. None (use `decode`)
    for other codecs, a payload with a non-finite marker or scales that leave
    dtype's range; a payload of the wrong size raises CodecError."""
    num_groups, block, channels = shape
    n = num_groups * block * channels
    if spec.name not in ("int8", "int4") or spec.block_size != block:
        return None
    expected = inner_nbytes(n, dtype, spec)
    if inner.numel() != expected:
        raise CodecError(f"{spec.name} payload is {inner.numel()} bytes, expected {expected}")
    nb = num_groups * channels
    scale = _view(inner[: SCALE_BYTES * nb], torch.bfloat16).float()  # [G * C]
    qmax = INT8_QMAX if spec.name == "int8" else INT4_QMAX
    if nb and not float(scale.max()) * qmax <= torch.finfo(dtype).max:  # NaN too
        return None
    body = inner[SCALE_BYTES * nb :]
    if spec.name == "int8":
        codes = body.view(torch.int8)
        if n and int(codes.min()) == -128:
            return None
        codes = codes.view(num_groups, channels, block).transpose(1, 2).contiguous()
    else:
        nib = _unpack_nibbles(body, n)
        if n and int(nib.min()) == 0:
            return None
        codes = nib.view(num_groups, channels, block).transpose(1, 2).contiguous()
        codes = codes.view(torch.int8) - 8
    y = codes * scale.view(num_groups, 1, channels)  # [G, B, C] float32
    return y.to(dtype)


def decode_inner(
    inner: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], spec: CodecSpec
) -> torch.Tensor:
    """The tensor back from its payload before the zstd stage (a flat uint8 tensor
    nobody else holds, as `inner_of` returns)."""
    return _decode_inner(inner, dtype, tuple(shape), spec, owned=True)


def _decode_inner(
    inner: torch.Tensor,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    spec: CodecSpec,
    *,
    owned: bool = False,
) -> torch.Tensor:
    """The tensor back from an unzstd'ed payload. `owned`: inner is a fresh copy
    nobody else holds, so `none` may return a view of it instead of another copy."""
    n = math.prod(shape)
    expected = inner_nbytes(n, dtype, spec)
    if inner.numel() != expected:
        raise CodecError(f"{spec.name} payload is {inner.numel()} bytes, expected {expected}")
    if spec.name == "none":
        x = _view(inner, dtype).reshape(shape)
        return x if owned else x.clone()
    if spec.name == "lossless":
        return _unshuffle(inner, dtype, n).reshape(shape)
    if spec.name == "kmeans4":
        centroids = _view(inner[:CENTROID_BYTES], torch.float32)  # [16]
        idx = _unpack_nibbles(inner[CENTROID_BYTES:], n).long()
        return _finish(centroids[idx], dtype, shape)
    blocks = -(-n // spec.block_size)
    scale = _view(inner[: SCALE_BYTES * blocks], torch.bfloat16).float()  # [nb]
    body = inner[SCALE_BYTES * blocks :]
    if spec.name == "int8":
        codes = body.view(torch.int8)
        marker = -128
    elif spec.name == "fp8":
        codes = body.view(torch.float8_e4m3fn)  # NaN decodes as NaN by itself
        marker = None
    else:  # int4
        codes = _unpack_nibbles(body, n).to(torch.int8) - 8
        marker = -8
    vals = codes.float()
    y = (_blockify(vals, spec.block_size) * scale[:, None]).reshape(-1)[:n]
    # The marker is the least code: on CPU a min pass (vectorised) finds whether any
    # is there; on a GPU that would wait for the device, so the where always runs.
    on_cpu = y.device.type == "cpu"
    clean = marker is None or (on_cpu and (n == 0 or int(codes.min()) != marker))
    if marker is not None and clean:
        # Nothing to mark NaN; when no code times its scale leaves dtype's range
        # either, the where and clamp passes would change nothing.
        qmax = INT8_QMAX if spec.name == "int8" else INT4_QMAX
        if not scale.numel() or float(scale.max()) * qmax <= torch.finfo(dtype).max:
            return y.to(dtype).reshape(shape)
    if clean:
        return _finish(y, dtype, shape)
    return _finish(torch.where(codes == marker, math.nan, y), dtype, shape)


def _finish(y: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Clamps finite values into dtype's range (NaN stays NaN), casts, reshapes."""
    fmax = torch.finfo(dtype).max
    return y.clamp(-fmax, fmax).to(dtype).reshape(shape)


def _view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterprets uint8 bytes as dtype, copying first when the offset is unaligned."""
    if t.storage_offset() % dtype.itemsize:
        t = t.clone()
    return t.view(dtype)


def _blockify(flat: torch.Tensor, block: int) -> torch.Tensor:
    """[n] -> [nb, block], the last block zero-padded."""
    n = flat.numel()
    blocks = -(-n // block)
    pad = blocks * block - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(blocks, block)


def _block_scales(blocks: torch.Tensor, finite: torch.Tensor, qmax: float) -> torch.Tensor:
    """absmax over the finite values of each block / qmax, rounded up to bf16."""
    absmax = torch.where(finite, blocks.abs(), 0.0).amax(dim=1)  # [nb]
    return _round_up_to_bf16(absmax / qmax)


def _round_up_to_bf16(s: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16-representable value >= s, for s >= 0 finite (bf16 is the top
    half of an fp32; round the bit pattern up)."""
    bits = s.float().contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & -0x10000).view(torch.float32)


def _pack_nibbles(nib: torch.Tensor) -> torch.Tensor:
    """[n] uint8 in 0..15 -> [ceil(n/2)] bytes: element 2i low nibble, 2i+1 high."""
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_full((1,), 8)])
    pairs = nib.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of _pack_nibbles: [n] uint8 in 0..15."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]


def _shuffle(flat: torch.Tensor) -> torch.Tensor:
    """Byte planes, most significant first: [n * itemsize] uint8. One strided copy
    per plane (2x faster for fp32, 8x for bf16 than one transposing copy)."""
    size = flat.element_size()
    by_elem = flat.view(torch.uint8).view(flat.numel(), size)  # [n, itemsize], LSB first
    planes = torch.empty(size, flat.numel(), dtype=torch.uint8, device=flat.device)
    for p in range(size):
        planes[p].copy_(by_elem[:, size - 1 - p])
    return planes.reshape(-1)


def _unshuffle(inner: torch.Tensor, dtype: torch.dtype, n: int) -> torch.Tensor:
    size = dtype.itemsize
    if n == 0:
        return torch.empty(0, dtype=dtype, device=inner.device)
    planes = inner.view(size, n)
    by_elem = torch.empty(n, size, dtype=torch.uint8, device=inner.device)  # LSB first
    for p in range(size):
        by_elem[:, size - 1 - p].copy_(planes[p])
    return by_elem.reshape(-1).view(dtype)


def _kmeans4_encode(flat: torch.Tensor) -> torch.Tensor:
    """16 centroids fitted by Lloyd on (a sample of) the finite values; 4-bit indices."""
    finite = torch.isfinite(flat)
    has_bad = flat.numel() > 0 and not bool(finite.all())  # one host sync
    k = KMEANS_CLUSTERS - 1 if has_bad else KMEANS_CLUSTERS
    centroids = _fit_centroids(flat[finite] if has_bad else flat, k)  # [k] ascending
    bounds = (centroids[1:] + centroids[:-1]) / 2  # [k - 1]
    idx = torch.bucketize(torch.where(finite, flat, 0.0), bounds)  # nearest centroid
    if has_bad:
        centroids = torch.cat([centroids, centroids.new_full((1,), math.nan)])
        idx = torch.where(finite, idx, KMEANS_CLUSTERS - 1)
    return torch.cat([centroids.view(torch.uint8), _pack_nibbles(idx.to(torch.uint8))])


def _fit_centroids(values: torch.Tensor, k: int) -> torch.Tensor:
    """Lloyd iterations in 1-D from quantile init; values normalised by absmax so
    sums neither overflow nor underflow. Returns [k] float32, ascending."""
    if values.numel() == 0:
        return values.new_zeros(k)
    stride = -(-values.numel() // KMEANS_FIT_SAMPLES)
    sample = values[::stride]  # [m]
    norm = sample.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    sample = (sample / norm).sort().values
    m = sample.numel()
    pos = ((torch.arange(k, device=values.device) + 0.5) * (m / k)).long().clamp(max=m - 1)
    c = sample[pos]  # [k] quantiles
    ones = torch.ones_like(sample)
    for _ in range(KMEANS_ITERS):
        assign = torch.bucketize(sample, (c[1:] + c[:-1]) / 2)  # [m]
        sums = torch.zeros_like(c).scatter_add_(0, assign, sample)
        counts = torch.zeros_like(c).scatter_add_(0, assign, ones)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values
    return c * norm
