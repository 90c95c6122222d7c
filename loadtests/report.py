"""Turns locust CSV sets from loadtests/locustfile.py into a markdown report and plots.

    python loadtests/report.py loadtests/results/run --out loadtests/results
    python loadtests/report.py none=results/none int8=results/int8 --out results/cmp

Each argument is a CSV prefix (what was given to `locust --csv`), optionally
labelled `LABEL=PREFIX`; several prefixes with one label form one
configuration (e.g. steady runs at 1, 4 and 16 users). Unlabelled prefixes are
named after their file name.

Reads, per prefix, `PREFIX_stats.csv` (locust's totals per row) and
`PREFIX_calls.csv` (one line per call, written by the locustfile), and writes:

- `report.md`: a per-task table (calls, failures, TTFT / ITL / E2E
  percentiles as locust computed them, ITL per token, tokens/s) and a table per
  configuration and user count (calls/s, tokens/s, TTFT / ITL / E2E
  percentiles from the calls, ITL as each call's mean gap);
- `latency_vs_users.png`: TTFT, ITL and E2E p50 (solid) and p95 (dashed)
  against concurrent users, one colour per configuration;
- `throughput_vs_users.png`: generated tokens/s and calls/s against users.

A call is counted at the user count running when it ended; the time spent at a
user count comes from the call log's first and last call at that count.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("TTFT", "ITL", "E2E")


@dataclass(frozen=True)
class TaskRow:
    """One task's TTFT, ITL and E2E rows of a locust _stats.csv."""

    task: str
    calls: int
    failures: int
    p50: dict[str, float]
    p95: dict[str, float]
    tokens_per_s: float


@dataclass(frozen=True)
class Call:
    end_time: float
    users: int
    task: str
    status: str
    ttft_ms: float | None
    itl_ms: float | None
    e2e_ms: float
    tokens: int


@dataclass
class Config:
    label: str
    prefixes: list[Path] = field(default_factory=list)
    tasks: list[tuple[str, TaskRow]] = field(default_factory=list)  # (run name, row)
    # Calls of each run, kept apart: time spans are measured within one run.
    runs: list[list[Call]] = field(default_factory=list)


@dataclass(frozen=True)
class UserPoint:
    users: int
    calls: int
    failures: int
    seconds: float
    tokens: int
    ttft_ms: tuple[float | None, float | None]
    itl_ms: tuple[float | None, float | None]
    e2e_ms: tuple[float | None, float | None]

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# -- reading -------------------------------------------------------------------------


def parse_target(arg: str) -> tuple[str, Path]:
    """`LABEL=PREFIX` or `PREFIX` (labelled by its file name)."""
    label, sep, prefix = arg.partition("=")
    if not sep:
        return Path(arg).name, Path(arg)
    return label, Path(prefix)


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_stats(path: Path) -> list[TaskRow]:
    """Per-task rows of a locust `_stats.csv`, tasks in file order."""
    rows: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["Type"] in KINDS:
                rows[row["Name"]][row["Type"]] = row
    out = []
    for task, kinds in rows.items():
        e2e = kinds.get("E2E")
        if e2e is None:
            continue
        p50 = {k: _float(kinds[k]["50%"]) for k in KINDS if k in kinds}
        p95 = {k: _float(kinds[k]["95%"]) for k in KINDS if k in kinds}
        rps = _float(e2e["Requests/s"]) or 0.0
        size = _float(e2e["Average Content Size"]) or 0.0
        out.append(
            TaskRow(
                task=task,
                calls=int(e2e["Request Count"]),
                failures=int(e2e["Failure Count"]),
                p50={k: v for k, v in p50.items() if v is not None},
                p95={k: v for k, v in p95.items() if v is not None},
                tokens_per_s=rps * size,
            )
        )
    return out


def read_calls(prefix: Path) -> list[Call]:
    calls: list[Call] = []
    for path in sorted(prefix.parent.glob(f"{prefix.name}_calls*.csv")):
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                calls.append(
                    Call(
                        end_time=float(row["end_time"]),
                        users=int(row["users"]),
                        task=row["task"],
                        status=row["status"],
                        ttft_ms=_float(row["ttft_ms"]),
                        itl_ms=_float(row["itl_ms"]),
                        e2e_ms=float(row["e2e_ms"]),
                        tokens=int(row["tokens"]),
                    )
                )
    calls.sort(key=lambda c: c.end_time)
    return calls


def load(targets: Sequence[str]) -> list[Config]:
    configs: dict[str, Config] = {}
    for arg in targets:
        label, prefix = parse_target(arg)
        config = configs.setdefault(label, Config(label))
        config.prefixes.append(prefix)
        stats = prefix.parent / f"{prefix.name}_stats.csv"
        if not stats.is_file():
            raise FileNotFoundError(f"{stats} not found (give the prefix passed to --csv)")
        config.tasks += [(prefix.name, row) for row in read_stats(stats)]
        calls = read_calls(prefix)
        if not calls:
            logger.warning("%s: no %s_calls*.csv; no plots for it", prefix, prefix.name)
        config.runs.append(calls)
    return list(configs.values())


# -- numbers -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in 0..100; None for no values."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _p50_p95(values: Sequence[float]) -> tuple[float | None, float | None]:
    return percentile(values, 50), percentile(values, 95)


def user_points(config: Config) -> list[UserPoint]:
    """Calls grouped by the user count they ended at, over every run of the config."""
    groups: dict[int, list[Call]] = defaultdict(list)
    seconds: dict[int, float] = defaultdict(float)
    for calls in config.runs:
        by_users: dict[int, list[Call]] = defaultdict(list)
        for call in calls:
            by_users[call.users].append(call)
        for users, group in by_users.items():
            groups[users] += group
            seconds[users] += _span(group)
    points = []
    for users in sorted(groups):
        if users <= 0:
            continue
        group = groups[users]
        ok = [c for c in group if c.status == "OK"]
        points.append(
            UserPoint(
                users=users,
                calls=len(group),
                failures=len(group) - len(ok),
                seconds=seconds[users],
                tokens=sum(c.tokens for c in group),
                ttft_ms=_p50_p95([c.ttft_ms for c in ok if c.ttft_ms is not None]),
                itl_ms=_p50_p95([c.itl_ms for c in ok if c.itl_ms is not None]),
                e2e_ms=_p50_p95([c.e2e_ms for c in ok]),
            )
        )
    return points


def _span(calls: Sequence[Call]) -> float:
    """Seconds covered by calls at one user count: first call's start to last end."""
    start = min(c.end_time - c.e2e_ms / 1000.0 for c in calls)
    return max(c.end_time for c in calls) - start


# -- markdown ------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 or value.is_integer() else f"{value:.1f}"


def task_table(configs: Sequence[Config]) -> str:
    head = (
        "| config | run | task | calls | failed | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 "
        "| E2E p50 | E2E p95 | tokens/s |"
    )
    lines = [head, "|" + "---|" * 4 + "---:|" * 8]
    for config in configs:
        for run, row in config.tasks:
            lines.append(
                f"| {config.label} | {run} | {row.task} | {row.calls} | {row.failures} "
                f"| {_ms(row.p50.get('TTFT'))} | {_ms(row.p95.get('TTFT'))} "
                f"| {_ms(row.p50.get('ITL'))} | {_ms(row.p95.get('ITL'))} "
                f"| {_ms(row.p50.get('E2E'))} | {_ms(row.p95.get('E2E'))} "
                f"| {row.tokens_per_s:.1f} |"
            )
    return "\n".join(lines)


def users_table(configs: Sequence[Config]) -> str:
    head = (
        "| config | users | calls | failed | calls/s | tokens/s | TTFT p50 | TTFT p95 "
        "| ITL p50 | ITL p95 | E2E p50 | E2E p95 |"
    )
    lines = [head, "|---|" + "---:|" * 11]
    for config in configs:
        for p in user_points(config):
            lines.append(
                f"| {config.label} | {p.users} | {p.calls} | {p.failures} "
                f"| {p.calls_per_s:.2f} | {p.tokens_per_s:.1f} "
                f"| {_ms(p.ttft_ms[0])} | {_ms(p.ttft_ms[1])} "
                f"| {_ms(p.itl_ms[0])} | {_ms(p.itl_ms[1])} "
                f"| {_ms(p.e2e_ms[0])} | {_ms(p.e2e_ms[1])} |"
            )
    return "\n".join(lines)


def markdown(configs: Sequence[Config], images: Iterable[str]) -> str:
    parts = [
        "# shardwire load test",
        "",
        "Latencies in milliseconds. TTFT: call start to first token. ITL: gap between "
        "tokens (per token in the first table, each call's mean gap in the second). "
        "E2E: call start to last token.",
        "",
        "## By task",
        "",
        task_table(configs),
        "",
        "## By concurrent users",
        "",
        users_table(configs),
        "",
    ]
    for image in images:
        parts += [f"![{Path(image).stem}]({image})", ""]
    return "\n".join(parts)


# -- plots ---------------------------------------------------------------------------


def plot(configs: Sequence[Config], out: Path) -> list[Path]:
    """Writes the two PNGs; returns their paths (none when no config has calls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = [(c.label, user_points(c)) for c in configs]
    series = [(label, points) for label, points in series if points]
    if not series:
        return []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.2), dpi=100)
    for ax, (title, attr) in zip(
        axes,
        (("TTFT", "ttft_ms"), ("ITL (mean per call)", "itl_ms"), ("E2E", "e2e_ms")),
        strict=True,
    ):
        for i, (label, points) in enumerate(series):
            color = colors[i % len(colors)]
            users = [p.users for p in points]
            p50 = [getattr(p, attr)[0] for p in points]
            p95 = [getattr(p, attr)[1] for p in points]
            ax.plot(users, p50, marker="o", color=color, label=f"{label} p50")
            ax.plot(users, p95, marker="o", linestyle="--", color=color, label=f"{label} p95")
        ax.set_title(title)
        ax.set_xlabel("concurrent users")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = out / "latency_vs_users.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for i, (label, points) in enumerate(series):
        color = colors[i % len(colors)]
        users = [p.users for p in points]
        axes[0].plot(users, [p.tokens_per_s for p in points], marker="o", color=color, label=label)
        axes[1].plot(users, [p.calls_per_s for p in points], marker="o", color=color, label=label)
    for ax, title in zip(axes, ("generated tokens/s", "calls/s"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("concurrent users")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = out / "throughput_vs_users.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


# -- main ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", help="CSV prefix or LABEL=PREFIX (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quiet", action="store_true", help="do not print the markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        configs = load(args.targets)
    except FileNotFoundError as err:
        logger.error("%s", err)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    images = plot(configs, args.out)
    text = markdown(configs, [p.name for p in images])
    (args.out / "report.md").write_text(text, encoding="utf-8")
    if not args.quiet:
        print(text)
    logger.info("wrote %s", ", ".join(str(p) for p in [args.out / "report.md", *images]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
