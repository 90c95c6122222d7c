"""What each rank of a test group runs (importable, so spawned ranks find it).

Every rank issues the same collectives in the same order; assertions sit
outside the collectives and are recorded by name (see CheckList)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from serve.comm.codecs import CodecSpec, encode_to_uint8, max_encoded_nbytes
from serve.comm.collectives import CommConfig, Communicator, tree_sum
from serve.comm.linkmodel import CANDIDATES, CodecCost, LinkModel
from tests.integration.comm.group import CheckList, Checks

DTYPES = (torch.float32, torch.bfloat16)
LOSSY = ("int8", "int8+zstd", "fp8", "fp8+zstd", "int4", "int4+zstd")
QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
# Small enough that the 3- and 4-rank groups take the two-shot path too.
TWO_SHOT_BYTES = 64 * 1024
# Element counts: tiny, odd, one token, and (fp32/bf16) over the two-shot size;
# 70000 fp32 elements (280 KB) take the ring path beyond two ranks.
SIZES = (1, 7, 896, 40000, 70000)


def make_input(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's data: N(0, 1) with every 97th element a 10x outlier."""
    g = torch.Generator().manual_seed(1000 * rank + n)
    x = torch.randn(n, generator=g)
    x[::97] *= 10
    return x.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bitwise comparison."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def same_on_all_ranks(comm: Communicator, t: torch.Tensor) -> bool:
    rows = comm.all_gather(t.reshape(1, -1), dim=0)
    return all(bit_equal(rows[r], rows[0]) for r in range(rows.shape[0]))


def _eps(dtype: torch.dtype) -> float:
    """Half an ulp, relative: rounding a value to dtype moves it at most this much."""
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]


def element_bound(x: torch.Tensor, spec: CodecSpec, dtype: torch.dtype) -> torch.Tensor:
    """The largest error the codec may make on each element of x (finite x),
    including the cast of the decoded value to dtype."""
    f = x.float().reshape(-1).abs()
    n, block = f.numel(), spec.block_size
    padded = torch.cat([f, f.new_zeros(-n % block)])
    # Block scale: absmax / qmax, rounded up to a bf16 value (< 2^-7 relative).
    scale = padded.view(-1, block).amax(dim=1) / QMAX[spec.name] * (1 + 2.0**-7)
    scale = scale.repeat_interleave(block)[:n]
    # fp8: 3 mantissa bits, and fixed steps below e4m3's normal range.
    b = 2.0**-4 * f + 2.0**-10 * scale if spec.name == "fp8" else scale / 2
    return b + _eps(dtype) * (f + b)


def reduce_bound(xs: list[torch.Tensor], spec: CodecSpec, two_shot: bool) -> torch.Tensor:
    """Per-element bound on |all_reduce(xs) - exact sum| for a lossy codec.
    Two-shot chunks are whole blocks, so blocks are the same on both paths."""
    dtype = xs[0].dtype
    exact = tree_sum([x.float() for x in xs]).reshape(-1).abs()
    b = sum(element_bound(x, spec, dtype) for x in xs)
    # The float32 sum is rounded to dtype once.
    b = b + _eps(dtype) * (exact + b)
    if two_shot:
        # The owner of each chunk codes the chunk's sum once more.
        b = b + element_bound(exact + b, spec, dtype)
    return b + 1e-6


def collective_checks(rank: int, world: int) -> Checks:
    cl = CheckList()
    ring_path = CommConfig().ring_bytes
    plain = Communicator(rank, world, CommConfig(two_shot_bytes=TWO_SHOT_BYTES))

    # -- exact path: bit-exact, every rank the same bits ------------------------
    for dtype in DTYPES:
        for n in SIZES:
            xs = [make_input(r, n, dtype) for r in range(world)]
            mine = xs[rank].clone()
            out = plain.all_reduce(xs[rank])
            ref = xs[rank].clone()
            dist.all_reduce(ref)
            same = same_on_all_ranks(plain, out)
            tag = f"{dtype} n={n}"
            ring = world > 2 and n * xs[0].element_size() >= ring_path
            with cl.check("none: bit-exact pairwise sum in rank order"):
                assert ring or bit_equal(out, tree_sum(xs)), tag
            with cl.check("none: equals torch all_reduce (2 ranks, ring path)"):
                assert not (world == 2 or ring) or bit_equal(out, ref), tag
            with cl.check("none: identical on all ranks"):
                assert same, tag
            with cl.check("none: input left as is"):
                assert bit_equal(xs[rank], mine), tag

    # -- compressed paths -------------------------------------------------------
    for codec in ("lossless", *LOSSY):
        comm = Communicator(
            rank,
            world,
            CommConfig(codec=codec, small_message_bytes=0, two_shot_bytes=TWO_SHOT_BYTES),
        )
        spec = CodecSpec.parse(codec)
        for dtype in DTYPES:
            for n in SIZES[:4]:
                xs = [make_input(r, n, dtype) for r in range(world)]
                out = comm.all_reduce(xs[rank])
                same = same_on_all_ranks(plain, out)
                tag = f"{codec} {dtype} n={n}"
                two_shot = world > 2 and n * xs[0].element_size() >= TWO_SHOT_BYTES
                with cl.check(f"{codec}: identical on all ranks"):
                    assert same, tag
                with cl.check(f"{codec}: within the codec's error bound"):
                    if spec.is_exact:
                        assert bit_equal(out, tree_sum(xs)), tag
                    else:
                        err = (out.float().reshape(-1) - tree_sum([x.float() for x in xs])).abs()
                        bound = reduce_bound(xs, spec, two_shot)
                        worst = float((err - bound).max())
                        assert worst <= 0, f"{tag}: error exceeds the bound by {worst}"
                with cl.check(f"{codec}: shape and dtype kept"):
                    assert out.shape == xs[rank].shape and out.dtype == dtype, tag

    # -- pipelined two-rank exchange: the same bits as one piece ------------------
    if world == 2:
        for codec in ("lossless", "int8", "int8+zstd", "int4"):
            cfg = CommConfig(codec=codec, small_message_bytes=0)
            piped = Communicator(rank, world, replace(cfg, pipeline_chunk_bytes=16 * 1024))
            whole = Communicator(rank, world, replace(cfg, pipeline_chunk_bytes=0))
            for dtype in DTYPES:
                xs = [make_input(r, 40000, dtype) for r in range(world)]
                a = piped.all_reduce(xs[rank])
                b = whole.all_reduce(xs[rank])
                same = same_on_all_ranks(plain, a)
                with cl.check(f"pipelined {codec}: same bits as unsplit, on all ranks"):
                    assert bit_equal(a, b) and same, f"{codec} {dtype}"
            with cl.check(f"pipelined {codec}: wire bytes counted"):
                c = piped.stats.by_codec[codec]
                assert c.messages == 2 and c.wire_bytes > 0
                if not CodecSpec.parse(codec).has_zstd:
                    assert c.wire_bytes == whole.stats.by_codec[codec].wire_bytes

    # -- small messages bypass a fixed codec ------------------------------------
    small = Communicator(rank, world, CommConfig(codec="int8"))
    xs = [make_input(r, 896, torch.bfloat16) for r in range(world)]
    out = small.all_reduce(xs[rank])
    with cl.check("int8: small messages take the exact path"):
        assert set(small.stats.by_codec) == {"none"}
        assert bit_equal(out, tree_sum(xs))

    _counter_checks(cl, rank, world)
    _auto_checks(cl, rank, world, plain)

    # -- all_gather and broadcast -----------------------------------------------
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    gathered = plain.all_gather(x, dim=-1)
    src = world - 1
    b = plain.broadcast_tensor(
        torch.arange(12, dtype=torch.bfloat16).reshape(3, 4) if rank == src else None, src=src
    )
    with cl.check("all_gather concatenates in rank order"):
        expect = torch.cat([torch.arange(6.0).reshape(2, 3) + 10 * r for r in range(world)], -1)
        assert torch.equal(gathered, expect)
    with cl.check("broadcast_tensor carries shape and dtype"):
        assert b.dtype == torch.bfloat16 and torch.equal(
            b, torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
        )
    return cl.results


def _counter_checks(cl: CheckList, rank: int, world: int) -> None:
    n = 1000
    nbytes = 2 * n
    steps = world.bit_length() - 1 if world & (world - 1) == 0 else world - 1
    for codec in ("none", "int8", "int4", "int8+zstd"):
        comm = Communicator(rank, world, CommConfig(codec=codec, small_message_bytes=0))
        x = make_input(rank, n, torch.bfloat16)
        comm.all_reduce(x)
        comm.all_reduce(x)
        c = comm.stats.by_codec.get(codec)
        with cl.check(f"counters: {codec} messages and raw bytes"):
            assert c is not None, comm.stats.snapshot()
            assert c.messages == 2 and c.raw_bytes == 2 * nbytes, comm.stats.snapshot()
            assert c.seconds > 0
        with cl.check(f"counters: {codec} wire bytes"):
            spec = CodecSpec.parse(codec)
            if codec == "none":
                expect = steps * nbytes
            elif not spec.has_zstd:
                expect = (world - 1) * max_encoded_nbytes(n, torch.bfloat16, spec)
            elif world == 2:  # the length word, then the frame
                expect = 8 + encode_to_uint8(x, spec).numel()
            else:
                expect = None
            assert expect is None or c.wire_bytes == 2 * expect, (c.wire_bytes, 2 * expect)


def _auto_checks(cl: CheckList, rank: int, world: int, plain: Communicator) -> None:
    # A quick probe: fewer codecs, small timing sizes (the numbers only have
    # to be the same everywhere).
    probed = LinkModel.probe(
        plain, rank, world, candidates=("none", "int8", "int4+zstd"), measure_numels=(512, 8192)
    )
    numbers = probed.to_tensor()
    with cl.check("auto: the probed model is the same on all ranks"):
        assert same_on_all_ranks(plain, numbers.view(torch.int32))
    sizes = [2**k for k in range(3, 26)]
    choices = torch.tensor(
        [
            [CANDIDATES.index(probed.choose_name(s, policy)) for s in sizes]
            for policy in ("exact", "lossless", "lossy")
        ],
        dtype=torch.int32,
    )
    with cl.check("auto: every rank picks the same codec for every size"):
        assert same_on_all_ranks(plain, choices)
    with cl.check("auto: exact policy picks none at every size"):
        assert all(CANDIDATES[i] == "none" for i in choices[0].tolist())
    with cl.check("auto: lossless policy stays exact"):
        assert all(CANDIDATES[i] in ("none", "lossless") for i in choices[1].tolist())

    exact = Communicator(rank, world, CommConfig(codec="auto", accuracy="exact"), link=probed)
    xs = [make_input(r, 40000, torch.bfloat16) for r in range(world)]
    out = exact.all_reduce(xs[rank])
    with cl.check("auto: exact policy is bit-exact"):
        assert exact.spec_for(xs[rank]) is None
        assert set(exact.stats.by_codec) == {"none"}
        assert bit_equal(out, tree_sum(xs))

    # A slow link (1 ms, 8 Mbit/s): small messages stay uncompressed, large
    # ones are coded, and the lossy policy goes furthest.
    slow = LinkModel(
        alpha_s=1e-3,
        beta_bytes_per_s=1e6,
        world_size=world,
        costs=(
            CodecCost("none"),
            CodecCost("lossless", 50e-6, 5e-9, 50e-6, 5e-9, 0.7),
            CodecCost("int8", 50e-6, 2e-9, 30e-6, 1e-9, 0.516),
            CodecCost("int4", 60e-6, 3e-9, 40e-6, 2e-9, 0.281),
        ),
    )
    lossy = Communicator(rank, world, CommConfig(codec="auto", accuracy="lossy"), link=slow)
    small_x = make_input(rank, 16, torch.bfloat16)
    large_x = make_input(rank, 40000, torch.bfloat16)
    out_small = lossy.all_reduce(small_x)
    out_large = lossy.all_reduce(large_x)
    same = same_on_all_ranks(plain, out_large)
    with cl.check("auto: lossy policy picks per size"):
        assert lossy.spec_for(small_x) is None
        spec = lossy.spec_for(large_x)
        assert spec is not None and spec.label == "int4", spec
        assert set(lossy.stats.by_codec) == {"none", "int4"}, lossy.stats.snapshot()
        assert bit_equal(
            out_small, tree_sum([make_input(r, 16, torch.bfloat16) for r in range(world)])
        )
    with cl.check("auto: lossy results identical on all ranks"):
        assert same
