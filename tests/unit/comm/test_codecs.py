import math

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.comm.codecs import (
    CODECS,
    LOSSLESS,
    CodecError,
    CodecSpec,
    Encoded,
    decode,
    decode_bytes,
    decode_from_uint8,
    encode,
    encode_to_uint8,
    max_encoded_nbytes,
    zstd_bound,
    zstd_decompress,
)
from serve.errors import InvalidArgument

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
LOSSY = ["int8", "fp8", "int4", "kmeans4"]
# Relative rounding of the final cast to the original dtype (half an ulp).
OUT_REL = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OUT_ABS = {torch.float32: 1e-38, torch.bfloat16: 1e-38, torch.float16: 2.0**-25}
SCALE_SLACK = 1 + 2.0**-7  # block scales are rounded up to bf16

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns: NaN payloads, +-Inf, -0.0 and denormals included."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def activations(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Heavy-tailed values with a few outliers of very different magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.distributions.StudentT(3.0).sample((n,)) if n else torch.zeros(0)
    x = x * torch.exp(torch.randn(n, generator=gen) * 2)
    if n > 3:
        x[torch.randint(0, n, (2,), generator=gen)] *= 1000
    return x.to(dtype).reshape(shape)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.itemsize])


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: absmax of the finite values of its block (flattened, padded)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // block)
    pad = torch.cat([flat, flat.new_zeros(nb * block - n)]).view(nb, block)
    amax = torch.where(torch.isfinite(pad), pad.abs(), 0).amax(dim=1)
    return amax.repeat_interleave(block)[:n]


# --- specs ---------------------------------------------------------------------------------


def test_parse_and_defaults() -> None:
    assert CodecSpec.parse("int8") == CodecSpec("int8", 0, 64)
    assert CodecSpec.parse("int8+zstd") == CodecSpec("int8", 1, 64)
    assert CodecSpec.parse("INT8+zstd", zstd_level=3) == CodecSpec("int8", 3)
    assert CodecSpec.parse("fp8+zstd2").zstd_level == 2
    assert CodecSpec.parse("int4").block_size == 32
    assert CodecSpec.parse("int4", block_size=64).block_size == 64
    assert CodecSpec("int4") == CodecSpec("int4", block_size=32) == CodecSpec("int4", 0, 0)
    assert CodecSpec.parse("lossless") == CodecSpec("lossless", 1)
    assert CodecSpec("lossless").zstd_level == 1
    assert CodecSpec.parse("none").zstd_level == 0
    assert CodecSpec("none", block_size=16).block_size == 64  # unused, normalised
    for name in CODECS:
        spec = CodecSpec.parse(name)
        assert spec.is_exact == (name in LOSSLESS)
        assert CodecSpec.parse(spec.label) == spec
    assert CodecSpec.parse("int8+zstd", 3).label == "int8+zstd"


@pytest.mark.parametrize(
    "text", ["", "int3", "none+zstd", "lossless+zstd", "int8+lz4", "int8+zstdx", "int8+zstd0"]
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        CodecSpec.parse(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "int8", "zstd_level": -1},
        {"name": "int8", "zstd_level": 23},
        {"name": "none", "zstd_level": 1},
        {"name": "int8", "block_size": -1},
        {"name": "int8", "block_size": 1 << 20},
        {"name": "int8", "zstd_level": True},
    ],
)
def test_spec_refuses(kwargs: dict) -> None:
    with pytest.raises(CodecError):
        CodecSpec(**kwargs)


# --- exact codecs --------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOATS + [torch.float64, torch.int32, torch.int64, torch.uint8]),
    name=st.sampled_from(sorted(LOSSLESS)),
    level=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_exact_codecs_are_bit_exact(shape, dtype, name, level, seed) -> None:
    x = random_bits(shape, dtype, seed)
    spec = CodecSpec(name, 0 if name == "none" else level)
    enc = encode(x, spec)
    y = decode(enc)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(bits(y), bits(x))
    z = decode_from_uint8(encode_to_uint8(x, spec), dtype, x.shape, spec)
    assert torch.equal(bits(z), bits(x))
    assert enc.nbytes <= max_encoded_nbytes(x.numel(), dtype, spec)
    if name == "none":
        assert enc.nbytes == x.numel() * x.element_size()


def test_exact_codecs_keep_special_values() -> None:
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -1e-45, 3.4e38]
    x = torch.tensor(special, dtype=torch.float32)
    x = torch.cat([x, torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)])
    for name in LOSSLESS:
        assert torch.equal(bits(decode(encode(x, CodecSpec(name)))), bits(x))
    h = torch.tensor([0.0, -0.0, math.inf, math.nan, 6e-8, 65504.0], dtype=torch.float16)
    assert torch.equal(bits(decode(encode(h, CodecSpec("lossless")))), bits(h))


def test_lossless_byte_planes_compress_activations() -> None:
    x = activations((64, 896), torch.bfloat16, 0)
    enc = encode(x, CodecSpec("lossless"))
    assert enc.ratio < 0.9  # sign/exponent plane compresses; DESIGN measured ~0.7
    assert torch.equal(bits(decode(enc)), bits(x))


def test_none_payload_is_the_tensor_memory() -> None:
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # non-contiguous
    enc = encode(x, CodecSpec("none"))
    assert bytes(enc.payload.numpy()) == x.contiguous().numpy().tobytes()
    assert torch.equal(decode(enc), x)


# --- lossy codecs --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(FLOATS),
    name=st.sampled_from(LOSSY),
    block=st.sampled_from([0, 1, 7, 32, 64, 128]),
    level=st.sampled_from([0, 1]),
    special=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_lossy_error_bounds(shape, dtype, name, block, level, special, seed) -> None:
    x = activations(shape, dtype, seed)
    if special and x.numel() >= 4:
        flat = x.view(-1)
        flat[0], flat[1], flat[2], flat[3] = math.nan, math.inf, -math.inf, 0.0
    spec = CodecSpec(name, level, block)
    enc = encode(x, spec)
    y = decode(enc)
    assert y.dtype == dtype and y.shape == x.shape
    xf, yf = x.reshape(-1).float(), y.reshape(-1).float()
    finite = torch.isfinite(xf)
    assert torch.isnan(yf[~finite]).all()  # non-finite decodes as NaN
    assert torch.isfinite(yf[finite]).all()
    err = (yf - xf)[finite].abs()
    slack = OUT_REL[dtype] * yf[finite].abs() + OUT_ABS[dtype]
    if name == "kmeans4":
        vals = xf[finite]
        span = (vals.max() - vals.min()).item() if vals.numel() else 0.0
        assert (err <= span * (1 + 1e-6) + slack).all()
    else:
        qmax = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[name]
        scale = block_absmax(x, spec.block_size)[finite] / qmax * SCALE_SLACK
        if name == "fp8":
            bound = 2.0**-4 * xf[finite].abs() + 2.0**-10 * scale
        else:
            bound = scale / 2
        assert (err <= bound * (1 + 1e-6) + slack).all(), (err - bound).max()
    if not level:
        assert enc.nbytes == max_encoded_nbytes(x.numel(), dtype, spec)
    else:
        assert enc.nbytes <= max_encoded_nbytes(x.numel(), dtype, spec)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("dtype", FLOATS)
def test_all_zero_blocks_decode_zeros(name: str, dtype: torch.dtype) -> None:
    x = torch.zeros(3, 100, dtype=dtype)
    x[1, 5] = 2.5  # one non-zero block among zero ones
    y = decode(encode(x, CodecSpec(name)))
    assert not torch.isnan(y).any()
    assert (y[0] == 0).all() and (y[2] == 0).all()
    assert torch.equal(
        decode(encode(torch.zeros(7, dtype=dtype), CodecSpec(name))), torch.zeros(7, dtype=dtype)
    )


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_all_finite_input_encodes_like_the_general_path(
    name: str, dtype: torch.dtype, special: float
) -> None:
    """All-finite tensors take a shorter path (no NaN bookkeeping, no clamp): its
    blocks must be byte for byte those of the general path, which a non-finite
    value in the last block forces."""
    block = 16
    x = activations((6 * block,), dtype, seed=3)
    x[: 2 * block] = 0.0  # all-zero blocks too
    marked = x.clone()
    marked[-1] = special
    spec = CodecSpec(name, block_size=block)
    fast, general = encode_to_uint8(x, spec), encode_to_uint8(marked, spec)
    num_scales = 2 * 6  # bf16 scales first, then the codes
    code_bytes = (5 * block) // (1 if name == "int8" else 2)
    assert torch.equal(fast[: num_scales - 2], general[: num_scales - 2])
    body = slice(num_scales, num_scales + code_bytes)
    assert torch.equal(fast[body], general[body])
    y = decode_from_uint8(fast, dtype, x.shape, spec)
    y_marked = decode_from_uint8(general, dtype, x.shape, spec)
    assert torch.equal(bits(y[: 5 * block]), bits(y_marked[: 5 * block]))


@pytest.mark.parametrize("name", ["int8", "fp8", "int4"])
def test_outlier_hurts_only_its_block(name: str) -> None:
    x = torch.randn(4 * 64, generator=torch.Generator().manual_seed(1))
    x[3] = 1e6
    y = decode(encode(x, CodecSpec(name, block_size=64)))
    assert abs(y[3].item() - 1e6) <= 1e6 * 0.08
    rest = (y[64:] - x[64:]).abs().max().item()
    assert rest < 0.1 * x[64:].abs().max().item()


@pytest.mark.parametrize("name", LOSSY)
def test_huge_values_neither_overflow_nor_vanish(name: str) -> None:
    x = torch.tensor([1e6, -1e6, 3.0e38, -3.0e38, 1e-30, 0.0])
    y = decode(encode(x, CodecSpec(name, block_size=2)))
    assert torch.isfinite(y).all()
    assert (y[:4] - x[:4]).abs().le(x[:4].abs() * 0.15).all()
    # fp16 at its maximum: the rounded-up scale must not push the value to Inf
    h = torch.tensor([65504.0, -65504.0, 1.0], dtype=torch.float16)
    yh = decode(encode(h, CodecSpec(name)))
    assert torch.isfinite(yh).all() and yh[0] >= 60000 and yh[1] <= -60000


def test_kmeans4_spends_a_centroid_on_nan() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    x[10] = math.inf
    enc = encode(x, CodecSpec("kmeans4"))
    centroids = enc.payload[:64].view(torch.float32)
    assert torch.isnan(centroids[15]) and torch.isfinite(centroids[:15]).all()
    y = decode(enc)
    assert torch.isnan(y[10]) and torch.isfinite(y[torch.arange(1000) != 10]).all()


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (1,), (1, 1, 1), (3, 5)])
def test_empty_and_scalar_tensors(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.full(shape, 1.5, dtype=dtype)
    for spec in (CodecSpec(name), CodecSpec.parse(name + ("+zstd" if name in LOSSY else ""))):
        y = decode(encode(x, spec))
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.allclose(y.float(), x.float(), atol=0.25)
        z = decode_from_uint8(encode_to_uint8(x, spec), dtype, shape, spec)
        assert torch.equal(bits(y), bits(z))


@pytest.mark.parametrize(
    "name, block, ratio",
    [
        ("none", 0, 1.0),
        ("int8", 64, 0.515625),
        ("fp8", 64, 0.515625),
        ("int8", 32, 0.53125),
        ("int4", 32, 0.28125),
        ("int4", 64, 0.265625),
        ("kmeans4", 0, 0.25 + 64 / (2 * 16 * 896)),
    ],
)
def test_exact_payload_sizes(name: str, block: int, ratio: float) -> None:
    x = activations((16, 896), torch.bfloat16, 3)
    spec = CodecSpec(name, block_size=block)
    enc = encode(x, spec)
    assert enc.nbytes == max_encoded_nbytes(x.numel(), x.dtype, spec)
    assert enc.nbytes / (x.numel() * 2) == pytest.approx(ratio, abs=1e-12)


def test_partial_blocks_send_a_scale_but_no_padding() -> None:
    assert max_encoded_nbytes(100, torch.float32, CodecSpec("int8")) == 100 + 2 * 2
    assert max_encoded_nbytes(100, torch.float16, CodecSpec("fp8")) == 100 + 2 * 2
    assert max_encoded_nbytes(100, torch.float32, CodecSpec("int4")) == 50 + 2 * 4
    assert max_encoded_nbytes(101, torch.float32, CodecSpec("int4")) == 51 + 2 * 4
    assert max_encoded_nbytes(101, torch.float32, CodecSpec("kmeans4")) == 51 + 64
    assert max_encoded_nbytes(0, torch.float32, CodecSpec("int8")) == 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 300_000), name=st.sampled_from(["int8", "int4", "fp8", "lossless"]))
def test_zstd_bound_holds_on_random_bytes(n: int, name: str) -> None:
    # random bit patterns do not compress: the worst case for the bound
    x = random_bits((n // 4,), torch.float32, n) if name == "lossless" else torch.randn(n // 8)
    spec = CodecSpec(name, 1)
    enc = encode(x, spec)
    assert enc.nbytes <= max_encoded_nbytes(x.numel(), x.dtype, spec)
    assert zstd_bound(n) >= n


# --- uint8 tensors, devices, misuse --------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "fp8", "int4", "kmeans4", "none"])
def test_decode_from_unaligned_slice(name: str) -> None:
    x = activations((5, 33), torch.bfloat16, 4)
    spec = CodecSpec(name)
    payload = encode_to_uint8(x, spec)
    gathered = torch.cat([torch.zeros(3, dtype=torch.uint8), payload])  # odd offset
    y = decode_from_uint8(gathered[3:], x.dtype, x.shape, spec)
    assert torch.equal(bits(y), bits(decode(encode(x, spec))))


@pytest.mark.parametrize("name", ["int8", "int4", "kmeans4", "none"])
def test_wrong_payload_size_is_refused(name: str) -> None:
    x = torch.randn(4, 64)
    spec = CodecSpec(name)
    payload = encode_to_uint8(x, spec)
    with pytest.raises(CodecError, match="expected"):
        decode_from_uint8(payload[:-2], x.dtype, x.shape, spec)
    with pytest.raises(CodecError):
        decode_bytes(bytes(payload.numpy()) + b"\0\0", x.dtype, x.shape, spec)


def test_unsupported_inputs() -> None:
    with pytest.raises(CodecError):
        encode(torch.arange(4), CodecSpec("int8"))
    with pytest.raises(CodecError):
        decode_from_uint8(
            torch.zeros(2, 2, dtype=torch.uint8), torch.float32, (1,), CodecSpec("none")
        )
    x = torch.arange(10, dtype=torch.int32)
    assert torch.equal(decode(encode(x, CodecSpec("lossless"))), x)


def test_encoded_is_a_frozen_record() -> None:
    x = torch.randn(8, 64)
    enc = encode(x, CodecSpec.parse("int8+zstd"))
    assert isinstance(enc, Encoded) and isinstance(enc.payload, bytes)
    assert enc.raw_nbytes == 8 * 64 * 4 and enc.shape == (8, 64) and enc.dtype == torch.float32
    with pytest.raises(AttributeError):
        enc.raw_nbytes = 1  # type: ignore[misc]
    assert encode(x, CodecSpec("int8", 1)).payload == enc.payload  # deterministic


def test_requires_grad_input() -> None:
    x = torch.randn(3, 64, requires_grad=True)
    y = decode(encode(x, CodecSpec("int8")))
    assert not y.requires_grad


def test_realistic_relative_errors() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 896, generator=gen)
    x[:, :4] *= 20  # outlier channels
    x = x.bfloat16()
    rms = x.float().pow(2).mean().sqrt()
    errs = {}
    for name in LOSSY:
        y = decode(encode(x, CodecSpec(name)))
        errs[name] = ((y.float() - x.float()).pow(2).mean().sqrt() / rms).item()
    assert errs["int8"] < 0.02 and errs["fp8"] < 0.04 and errs["int4"] < 0.2
    assert errs["int8"] < errs["fp8"] < errs["int4"]


# --- zstd stage ----------------------------------------------------------------------------


def test_zstd_declared_size_must_match() -> None:
    frame = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    assert len(zstd_decompress(frame, 1000)) == 1000
    with pytest.raises(CodecError, match="declares 1000"):
        zstd_decompress(frame, 999)
    with pytest.raises(CodecError, match="not a zstd frame"):
        zstd_decompress(b"garbage!", 10)
    with pytest.raises(CodecError):
        zstd_decompress(frame + b"x", 1000)  # trailing bytes


def test_zstd_without_declared_size_is_capped() -> None:
    cobj = zstandard.ZstdCompressor().compressobj()
    frame = cobj.compress(b"\0" * (1 << 20)) + cobj.flush()
    assert zstandard.frame_content_size(frame) == -1
    with pytest.raises(CodecError):
        zstd_decompress(frame, 1000)
    with pytest.raises(CodecError, match="holds"):
        zstd_decompress(frame, 2 << 20)  # shorter than expected
    assert len(zstd_decompress(frame, 1 << 20)) == 1 << 20


DEVICES = ["cuda"] if torch.cuda.is_available() else []


@pytest.mark.skipif(not DEVICES, reason="no CUDA device")
@pytest.mark.parametrize(
    "text", ["none", "lossless", "int8", "int8+zstd", "fp8", "int4", "kmeans4"]
)
@pytest.mark.parametrize("dtype", FLOATS)
def test_same_code_on_gpu(text: str, dtype: torch.dtype) -> None:
    spec = CodecSpec.parse(text)
    x = activations((33, 257), dtype, 7)
    x.view(-1)[:3] = torch.tensor([math.nan, math.inf, 0.0])
    gpu = encode_to_uint8(x.cuda(), spec)
    assert gpu.device.type == "cuda"
    y = decode_from_uint8(gpu, dtype, x.shape, spec)
    assert y.device.type == "cuda" and y.dtype == dtype
    cpu = encode_to_uint8(x, spec)
    if text == "kmeans4":  # centroid sums are reduced in another order on the GPU
        xf = x.float().view(-1)[3:]
        ref = decode_from_uint8(cpu, dtype, x.shape, spec).float().view(-1)[3:]
        err_gpu = (y.cpu().float().view(-1)[3:] - xf).pow(2).mean()
        assert err_gpu <= (ref - xf).pow(2).mean() * 1.05 + 1e-12
    else:
        assert torch.equal(gpu.cpu(), cpu)  # bit-identical payloads
        assert torch.equal(bits(y.cpu()), bits(decode_from_uint8(cpu, dtype, x.shape, spec)))
