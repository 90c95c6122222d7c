"""Time-bounded fuzzing: each fuzz test runs its hypothesis search again and again,
with fresh random seeds, until its share of the budget is spent.

FUZZ_SECONDS is the budget of the whole tests/fuzz directory (default 64 s, what
`make test` spends; `make fuzz` sets more). Each test takes the share of it named
in SHARES; the shares add up to 1."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings

DEFAULT_TOTAL_S = 64.0
SHARES: dict[str, float] = {
    "frames_bytes": 0.08,
    "frames_resealed": 0.10,
    "frames_assembler": 0.08,
    "plan_random": 0.06,
    "plan_mutated": 0.14,
    "admission_sampling": 0.05,
    "admission_prompts": 0.05,
    "admission_load_gate": 0.05,
    "gateway_requests": 0.19,
    "gateway_raw_bytes": 0.06,
    "shard_requests": 0.14,
}
# One hypothesis run: this many examples, then a fresh run with a new seed.
EXAMPLES_PER_RUN = 200
# An example slower than this fails (a hang is caught by pytest-timeout).
EXAMPLE_DEADLINE = timedelta(seconds=5)

FUZZ = settings(
    max_examples=EXAMPLES_PER_RUN,
    deadline=EXAMPLE_DEADLINE,
    database=None,
    derandomize=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


def total_s() -> float:
    return float(os.environ.get("FUZZ_SECONDS") or DEFAULT_TOTAL_S)


def budget_s(name: str) -> float:
    return total_s() * SHARES[name]


def timeout_s(name: str) -> float:
    """pytest-timeout for a test of this share: its budget plus room to finish a run."""
    return budget_s(name) + 120.0


def run_for(name: str, search: Callable[[], None]) -> int:
    """Runs the hypothesis test `search` until the budget of `name` is spent (at least
    once); returns the number of runs."""
    deadline = time.monotonic() + budget_s(name)
    runs = 0
    while runs == 0 or time.monotonic() < deadline:
        search()
        runs += 1
    return runs


def peak_rss_bytes() -> int:
    """The process's peak resident memory (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
