"""Load shapes and SLO checks of the locust suite, apart from locust itself so
they can be tested without gevent patching the test process.

Stats entries are duck-typed like locust's `StatsEntry`: `method` (the row
type: TTFT, ITL or E2E), `num_requests` (failures included), `num_failures`
and `response_times` ({milliseconds, rounded as locust does: count})."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

TTFT = "TTFT"
ITL = "ITL"
E2E = "E2E"
SHAPES = ("steady", "ramp", "spike")


class Entry(Protocol):
    method: str | None
    num_requests: int
    num_failures: int
    response_times: dict[int, int]


@dataclass(frozen=True)
class Slos:
    """Thresholds: a latency of 0 or less and a negative error rate are off."""

    ttft_p95_ms: float = 0.0
    itl_p95_ms: float = 0.0
    error_rate: float = -1.0

    @classmethod
    def from_options(cls, opts: Any) -> Slos:
        return cls(opts.slo_ttft_p95_ms, opts.slo_itl_p95_ms, opts.slo_error_rate)

    @property
    def any(self) -> bool:
        return self.ttft_p95_ms > 0 or self.itl_p95_ms > 0 or self.error_rate >= 0


def shape_users(shape: str, users: int, progress: float, steps: int = 4) -> int:
    """Users wanted at `progress` (0..1) of the run.

    ramp: `steps` equal plateaus up to `users`; spike: a quarter of `users`, all
    of them from 40% to 60% of the run; steady: `users` throughout."""
    if shape == "ramp":
        steps = max(1, steps)
        step = min(int(progress * steps), steps - 1) + 1
        return max(1, round(users * step / steps))
    if shape == "spike":
        base = max(1, users // 4)
        return users if 0.4 <= progress < 0.6 else base
    return users


def percentile_ms(entries: Iterable[Entry], kind: str, percent: float) -> float | None:
    """Nearest-rank percentile (0..1) over every row of `kind`, all tasks together."""
    merged: dict[int, int] = {}
    count = 0
    for entry in entries:
        if entry.method != kind:
            continue
        count += entry.num_requests
        for ms, n in entry.response_times.items():
            merged[ms] = merged.get(ms, 0) + n
    if not count:
        return None
    rank = max(1, math.ceil(percent * count))
    seen = 0
    for ms in sorted(merged):
        seen += merged[ms]
        if seen >= rank:
            return float(ms)
    return float(max(merged))


def error_rate(entries: Iterable[Entry]) -> float:
    """Failed calls over calls: every call has exactly one E2E row (failed ones too)."""
    calls = failures = 0
    for entry in entries:
        if entry.method == E2E:
            calls += entry.num_requests
            failures += entry.num_failures
    return failures / calls if calls else 0.0


def check_slos(entries: Iterable[Entry], slos: Slos) -> list[str]:
    """One line per missed SLO; empty when all are met."""
    entries = list(entries)
    missed: list[str] = []
    for kind, limit in ((TTFT, slos.ttft_p95_ms), (ITL, slos.itl_p95_ms)):
        if limit > 0:
            p95 = percentile_ms(entries, kind, 0.95)
            if p95 is None:
                missed.append(f"{kind} p95: no samples (SLO {limit:g} ms)")
            elif p95 > limit:
                missed.append(f"{kind} p95 {p95:g} ms > SLO {limit:g} ms")
    if slos.error_rate >= 0:
        rate = error_rate(entries)
        if rate > slos.error_rate:
            missed.append(f"error rate {rate:.4f} > SLO {slos.error_rate:g}")
    return missed
