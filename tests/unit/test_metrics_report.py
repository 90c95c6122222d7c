"""The load test's pure parts: load shapes, SLO checks and report.py.

The locustfile itself is exercised in tests/e2e/test_loadtest.py: importing
locust here would gevent-patch the test process."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loadtests import report
from loadtests.slo import Slos, check_slos, error_rate, percentile_ms, shape_users

STATS_HEADER = [
    "Type", "Name", "Request Count", "Failure Count", "Median Response Time",
    "Average Response Time", "Min Response Time", "Max Response Time", "Average Content Size",
    "Requests/s", "Failures/s", "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%",
    "99.9%", "99.99%", "100%",
]  # fmt: skip


@dataclass
class Entry:
    method: str
    num_requests: int
    num_failures: int = 0
    response_times: dict[int, int] = field(default_factory=dict)


def test_ramp_climbs_in_plateaus_and_spike_jumps_in_the_middle() -> None:
    assert [shape_users("ramp", 8, p) for p in (0.0, 0.24, 0.25, 0.6, 0.99, 1.0)] == [
        2, 2, 4, 6, 8, 8,
    ]  # fmt: skip
    assert shape_users("ramp", 3, 0.0, steps=3) == 1
    assert [shape_users("spike", 8, p) for p in (0.1, 0.45, 0.59, 0.6)] == [2, 8, 8, 2]
    assert shape_users("spike", 2, 0.0) == 1
    assert shape_users("steady", 5, 0.7) == 5


def test_percentile_merges_every_task_of_a_kind() -> None:
    entries = [
        Entry("TTFT", 10, response_times={10: 9, 500: 1}),
        Entry("TTFT", 10, response_times={20: 10}),
        Entry("E2E", 20, response_times={9000: 20}),
    ]
    assert percentile_ms(entries, "TTFT", 0.4) == 10
    assert percentile_ms(entries, "TTFT", 0.5) == 20
    assert percentile_ms(entries, "TTFT", 0.95) == 20
    assert percentile_ms(entries, "TTFT", 1.0) == 500
    assert percentile_ms(entries, "ITL", 0.95) is None


def test_slos_pass_fail_and_error_budget() -> None:
    entries = [
        Entry("TTFT", 100, response_times={50: 95, 400: 5}),
        Entry("ITL", 1000, response_times={5: 1000}),
        Entry("E2E", 100, num_failures=2, response_times={300: 100}),
    ]
    assert error_rate(entries) == pytest.approx(0.02)
    assert check_slos(entries, Slos(ttft_p95_ms=100, itl_p95_ms=10, error_rate=0.05)) == []
    missed = check_slos(entries, Slos(ttft_p95_ms=40, itl_p95_ms=4, error_rate=0.01))
    assert [m.split()[0] for m in missed] == ["TTFT", "ITL", "error"]
    assert check_slos([], Slos(ttft_p95_ms=1)) == ["TTFT p95: no samples (SLO 1 ms)"]
    assert not Slos().any and Slos(error_rate=0).any


def write_run(prefix: Path, users_calls: dict[int, int], ttft_ms: float) -> None:
    """A locust _stats.csv and a _calls.csv: `n` one-second calls per user count."""
    rows = []
    for kind, p50, size in (("TTFT", ttft_ms, 1), ("ITL", 4, 1), ("E2E", 1000, 32)):
        for task in ("chat", "generate"):
            rows.append(
                {
                    **dict.fromkeys(STATS_HEADER, "0"),
                    "Type": kind,
                    "Name": task,
                    "Request Count": "10",
                    "Failure Count": "1" if kind == "E2E" and task == "chat" else "0",
                    "Average Content Size": str(size),
                    "Requests/s": "2.0",
                    "50%": str(p50),
                    "95%": str(p50 * 2),
                }  # fmt: skip
            )
    rows.append({**dict.fromkeys(STATS_HEADER, "0"), "Type": "", "Name": "Aggregated"})
    with (prefix.parent / f"{prefix.name}_stats.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, STATS_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    t = 1000.0
    with (prefix.parent / f"{prefix.name}_calls.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["end_time", "users", "task", "status", "ttft_ms", "itl_ms", "e2e_ms", "tokens"]
        )
        for users, n in users_calls.items():
            for _ in range(n):
                t += 1.0
                writer.writerow([t, users, "chat", "OK", ttft_ms, 5.0, 1000.0, 20])
            writer.writerow([t, users, "chat", "UNAVAILABLE", "", "", 3.0, 0])


def test_report_writes_tables_and_plots_per_configuration(tmp_path: Path) -> None:
    write_run(tmp_path / "a1", {2: 10, 4: 10}, ttft_ms=20)
    write_run(tmp_path / "a2", {8: 5}, ttft_ms=40)
    write_run(tmp_path / "b", {2: 10}, ttft_ms=10)
    out = tmp_path / "out"
    targets = [f"int8={tmp_path / 'a1'}", f"int8={tmp_path / 'a2'}", f"none={tmp_path / 'b'}"]
    assert report.main([*targets, "--out", str(out), "--quiet"]) == 0

    configs = report.load(targets)
    assert [c.label for c in configs] == ["int8", "none"]
    points = report.user_points(configs[0])
    assert [p.users for p in points] == [2, 4, 8]
    two = points[0]
    assert (two.calls, two.failures, two.tokens) == (11, 1, 200)
    # Ten one-second calls back to back: the first starts 1 s before it ends.
    assert two.seconds == pytest.approx(10.0)
    assert two.tokens_per_s == pytest.approx(20.0)
    assert two.ttft_ms == (20.0, 20.0)

    text = (out / "report.md").read_text()
    assert "| int8 | a1 | chat | 10 | 1 | 20 | 40 | 4 | 8 | 1000 | 2000 | 64.0 |" in text
    assert "| none | 2 | 11 | 1 |" in text
    assert "![latency_vs_users](latency_vs_users.png)" in text
    for name in ("latency_vs_users.png", "throughput_vs_users.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_report_without_call_logs_still_writes_the_task_table(tmp_path: Path) -> None:
    write_run(tmp_path / "run", {1: 3}, ttft_ms=15)
    (tmp_path / "run_calls.csv").unlink()
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "run"), "--out", str(out), "--quiet"]) == 0
    assert "| run | run | generate | 10 | 0 |" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_report_names_a_missing_csv_set(tmp_path: Path) -> None:
    assert report.main([str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2


def test_percentile_interpolates() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert report.percentile([7.0], 95) == 7.0
