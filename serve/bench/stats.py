"""Small helpers the benchmarks share: percentiles of latency samples and
comma-separated option lists."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; nan when there are none."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count); nan when empty."""
    s = sorted(values)
    if not s:
        return math.nan
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def names(text: str) -> list[str]:
    """The non-empty items of a comma-separated option."""
    return [v.strip() for v in text.split(",") if v.strip()]
