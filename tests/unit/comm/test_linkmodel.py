"""The link cost model on synthetic numbers: fitting, prediction, choice per
policy, and the tensor that carries it from rank 0 to the others."""

from __future__ import annotations

import math

import pytest
import torch

from serve.comm.linkmodel import (
    CANDIDATES,
    CODEC_MARGIN,
    PROBE_LADDER,
    CodecCost,
    LinkModel,
    _fit,
    activation_like,
    measure_codecs,
)

US = 1e-6
INT8 = CodecCost("int8", 20 * US, 2e-9, 10 * US, 1e-9, 0.516)
INT4 = CodecCost("int4", 25 * US, 3e-9, 12 * US, 1.5e-9, 0.281)
INT4_ZSTD = CodecCost("int4+zstd", 40 * US, 6e-9, 20 * US, 3e-9, 0.25)
LOSSLESS = CodecCost("lossless", 30 * US, 8e-9, 20 * US, 5e-9, 0.7)
COSTS = (CodecCost("none"), LOSSLESS, INT8, INT4, INT4_ZSTD)


def link(mbit: float, alpha_us: float = 100, world: int = 2, **kw) -> LinkModel:
    return LinkModel(alpha_us * US, mbit * 1e6 / 8, world, 2, COSTS, **kw)


def test_fit_recovers_a_line_and_clamps_negative_slopes() -> None:
    a, b = _fit(1000, 1e-3 + 1000 * 2e-9, 100_000, 1e-3 + 100_000 * 2e-9)
    assert a == pytest.approx(1e-3) and b == pytest.approx(2e-9)
    a, b = _fit(1000, 5e-3, 100_000, 1e-3)  # noise: the larger size ran faster
    assert b == 0.0 and a == pytest.approx(5e-3)


def test_predict_follows_the_formula_for_two_ranks() -> None:
    m = link(100, add_a=1 * US, add_b=1e-10, pipeline_chunk_bytes=0)
    n = 1 << 20  # bytes of bf16
    numel = n / 2
    add = 1 * US + 1e-10 * numel
    beta = 100e6 / 8
    assert m.predict("none", n) == pytest.approx(100 * US + n / beta + add)
    expect = INT8.encode_s(numel) + 100 * US + 0.516 * n / beta + 2 * INT8.decode_s(numel) + add
    assert m.predict("int8", n) == pytest.approx(expect)
    # Exact codecs decode one copy (the peer's).
    expect = INT4_ZSTD.encode_s(numel) + 100 * US + 0.25 * n / beta + 2 * INT4_ZSTD.decode_s(numel)
    assert m.predict("int4+zstd", n) == pytest.approx(expect + add)
    expect = LOSSLESS.encode_s(numel) + 100 * US + 0.7 * n / beta + LOSSLESS.decode_s(numel)
    assert m.predict("lossless", n) == pytest.approx(expect + add)


def test_pipelined_messages_cost_the_larger_of_cpu_and_wire() -> None:
    whole = link(100, pipeline_chunk_bytes=0)
    piped = link(100, pipeline_chunk_bytes=256 * 1024)
    n = 8 << 20  # 32 chunks
    chunk = n / 2 / 32
    wire = 0.516 * n / (100e6 / 8)
    stream = INT8.encode_s(chunk) + 100 * US + wire + 2 * INT8.decode_s(chunk)
    cpu = 32 * (INT8.encode_s(chunk) + 2 * INT8.decode_s(chunk))
    assert piped.predict("int8", n) == pytest.approx(max(stream, cpu))
    assert piped.predict("int8", n) < whole.predict("int8", n)
    # Under two chunks: not split.
    assert piped.predict("int8", 300_000) == whole.predict("int8", 300_000)


def test_exchange_time_interpolates_the_probed_points() -> None:
    pts = ((8.0, 100 * US), (16384.0, 200 * US), (65536.0, 5e-3), (131072.0, 10e-3))
    m = LinkModel(100 * US, 65536 / 5e-3, points=pts)
    assert m.exchange_s(1) == pytest.approx(100 * US)  # below the first point
    assert m.exchange_s(16384) == pytest.approx(200 * US)  # a token bucket's burst
    assert m.exchange_s((16384 + 65536) / 2) == pytest.approx((200 * US + 5e-3) / 2)
    # Past the last point: its time plus the rest at beta.
    assert m.exchange_s(131072 + 65536) == pytest.approx(10e-3 + 5e-3)
    # Points are made monotone: a noisy larger size never looks faster.
    noisy = LinkModel(1e-4, 1e7, points=((8.0, 3e-4), (1024.0, 1e-4)))
    assert noisy.points[1][1] == 3e-4


def test_wire_bytes_of_quantizers_do_not_scale_with_the_element_size() -> None:
    m = link(100)
    assert m.wire_bytes("none", 4000, itemsize=4) == 4000
    assert m.wire_bytes("lossless", 4000, itemsize=4) == pytest.approx(2800)
    # 1000 fp32 elements cost what 1000 bf16 ones do once quantized.
    assert m.wire_bytes("int8", 4000, itemsize=4) == pytest.approx(2000 * 0.516)


def test_exact_policy_always_picks_none() -> None:
    m = link(10)
    for n in (2, 8192, 1 << 24):
        assert m.choose_name(n, "exact") == "none"
        assert m.choose(n, "exact").name == "none"


def test_slow_link_compresses_large_messages_but_not_tiny_ones() -> None:
    m = link(100)
    assert m.choose_name(16, "lossy") == "none"
    big = 2048 * 4096 * 2
    assert m.choose_name(big, "lossy") in ("int4", "int4+zstd")
    assert m.choose_name(big, "lossless") == "lossless"
    spec = m.choose(big, "lossy")
    assert spec.label == m.choose_name(big, "lossy")


def test_fast_link_stays_uncompressed() -> None:
    m = link(100_000, alpha_us=50)
    for n in (16, 8192, 1 << 20, 1 << 24):
        assert m.choose_name(n, "lossy") == "none"


def test_choice_is_the_least_predicted_time_within_the_policy() -> None:
    m = link(1000)
    for n in (1 << k for k in range(4, 25)):
        for policy, allowed in (
            ("lossless", {"none", "lossless"}),
            ("lossy", {c.name for c in COSTS}),
        ):
            best = min(allowed, key=lambda c: m.predict(c, n))
            chosen = m.choose_name(n, policy)
            if chosen == "none" and best != "none":  # within the margin of none
                assert m.predict(best, n) > (1 - CODEC_MARGIN) * m.predict("none", n)
            else:
                assert m.predict(chosen, n) == pytest.approx(m.predict(best, n))


def test_more_ranks_use_two_shot_for_large_messages() -> None:
    two_shot = link(100, world=4)
    one_shot = link(100, world=4, two_shot_bytes=1 << 40)
    n = 8 << 20
    # Two-shot sends 2 (N-1)/N = 1.5 coded copies per rank instead of N-1 = 3.
    assert two_shot.predict("int8", n) < 0.6 * one_shot.predict("int8", n)
    # Below the threshold both are the same one-shot formula.
    assert two_shot.predict("int8", 4096) == one_shot.predict("int8", 4096)


def test_tensor_round_trip_gives_the_same_model() -> None:
    m = link(100, add_a=2 * US, add_b=1e-10)
    names = [c.name for c in COSTS]
    back = LinkModel.from_tensor(m.to_tensor(), names, 2, 2)
    assert back == m
    pts = tuple((float(w), w * 1e-8 + 1e-4) for w in (*PROBE_LADDER, 1 << 20))
    m = link(100, points=pts)
    assert LinkModel.from_tensor(m.to_tensor(), names, 2, 2).points == pts
    with pytest.raises(ValueError):
        LinkModel.from_tensor(m.to_tensor()[:-1], names, 2, 2)


def test_a_model_without_none_gets_it_and_bad_numbers_are_refused() -> None:
    m = LinkModel(1e-4, 1e7, 2, 2, (INT8,))
    assert m.costs[0].name == "none"
    with pytest.raises(ValueError):
        LinkModel(1e-4, 0.0)
    with pytest.raises(ValueError):
        link(100).choose_name(10, "sloppy")


def test_decision_table_lists_every_size_and_codec() -> None:
    table = link(100).decision_table([8192, 1 << 20])
    lines = table.splitlines()
    assert "alpha 100 us" in lines[0] and "100 Mbit/s" in lines[0]
    assert all(c.name in lines[1] for c in COSTS)
    assert lines[3].startswith("| 8192 |") and lines[4].startswith("| 1048576 |")
    assert lines[4].rstrip(" |").endswith(link(100).choose_name(1 << 20, "lossy"))


def test_measured_codecs_have_their_wire_ratios() -> None:
    costs, add_a, add_b = measure_codecs(
        ["none", "int8", "int4", "lossless"], torch.bfloat16, numels=(512, 8192)
    )
    by = {c.name: c for c in costs}
    assert set(by) == {"none", "int8", "int4", "lossless"}
    assert by["int8"].wire_ratio == pytest.approx(0.516, abs=0.01)
    assert by["int4"].wire_ratio == pytest.approx(0.281, abs=0.01)
    assert 0.3 < by["lossless"].wire_ratio < 1.01
    for c in costs:
        assert min(c.enc_a, c.enc_b, c.dec_a, c.dec_b) >= 0 and math.isfinite(c.enc_b)
    assert add_a >= 0 and add_b >= 0


def test_activation_like_data_is_reproducible_and_heavy_tailed() -> None:
    a, b = activation_like(8192, torch.float32), activation_like(8192, torch.float32)
    assert torch.equal(a, b)
    assert a.abs().max() > 8 * a.std() / 2


def test_candidates_start_with_none() -> None:
    assert CANDIDATES[0] == "none" and "kmeans4" not in CANDIDATES
