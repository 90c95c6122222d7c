"""A 2-minute soak (serve.bench.soak, the driver of `make soak`) against
`shardwire up` with the tiny model, as real processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serve.bench.soak import KINDS, SoakConfig, format_report, run_soak

RSS_GROWTH_LIMIT_PCT = 10.0


@pytest.mark.timeout(480)
def test_two_minute_soak(tmp_path: Path) -> None:
    """Pass: after a 10 s calibration, 2 minutes of mixed load (Chat, Chat sessions,
    Translate, Generate by text and ids, TranslateLive, 10% random client cancels)
    at 70% of the measured capacity end with:
    - zero KV blocks leaked: once the replica is idle after the soak, the blocks in
      use (total - free, where free includes prefix-cached blocks of finished
      requests) equal those in use before it;
    - RSS growth under 10% for the gateway and the replica, measured as the median
      of the last three 5 s samples against the median of the three samples taken
      after the warm-up (the first 25% = 30 s of the soak), so allocator and cache
      warm-up do not count;
    - zero errors (any status but OK, except CANCELLED on calls the driver
      cancelled), no arrival dropped by the driver, every kind of the mix served
      and some calls cancelled;
    - a TTFT measured in the first and the last 30 s window (drift is reported,
      not bounded: these two cores are shared)."""
    cfg = SoakConfig(
        minutes=2.0,
        calibration_s=10.0,
        calibration_concurrency=12,
        sample_s=5.0,
        window_s=30.0,
        out=str(tmp_path / "soak.json"),
    )
    report = asyncio.run(run_soak(cfg))
    Path(cfg.out).write_text(json.dumps(report, indent=2))
    print(format_report(report))
    assert report["kv_blocks"], "no replica was watched"
    for name, kv in report["kv_blocks"].items():
        assert kv["idle"], f"{name} did not go idle"
        assert kv["leaked"] == 0, f"{name} leaked {kv['leaked']} KV blocks"
    assert set(report["rss"]) >= {"gateway"} and len(report["rss"]) >= 2
    for name, rss in report["rss"].items():
        assert rss["growth_pct"] < RSS_GROWTH_LIMIT_PCT, f"{name}: {rss}"
    assert report["num_errors"] == 0, report["errors"]
    assert report["dropped_by_driver"] == 0
    assert report["cancelled_by_client"] > 0
    for kind in KINDS:
        assert report["by_kind"][kind].get("OK", 0) > 0, f"no {kind} request finished"
    ttft = report["ttft"]
    assert ttft["first_window"]["p50_ms"] is not None
    assert ttft["last_window"]["p50_ms"] is not None
