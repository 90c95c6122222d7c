"""`make loadtest`: a local deployment, the locust suite headless, then the report.

    python -m loadtests.run --model tiny --users 8 --run-time 60s --shape ramp \
        -- --slo-ttft-p95-ms 2000 --slo-error-rate 0.01

Starts `shardwire up` on a free port, waits until it serves, runs
`locust -f loadtests/locustfile.py` headless with `--csv`, `--csv-full-history`
and `--html` into `--out` (files named `--name`), stops the deployment, runs
loadtests/report.py on the CSVs and exits with locust's exit code (3 when an
SLO was missed). Arguments after `--` go to locust unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loadtests import report
from serve.launch import free_port, wait_serving

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="what `shardwire up --model` serves")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="gateway port (0: a free one)")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=2.0)
    p.add_argument("--run-time", default="60s")
    p.add_argument("--shape", default="ramp", choices=("steady", "ramp", "spike"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="", help="file name of the CSV set (default: model-shape)")
    p.add_argument("--label", default="", help="configuration name in the report")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for `shardwire up` (repeatable), e.g. --server-arg=--kv-cache-mb=64",
    )
    p.add_argument("--start-timeout", type=float, default=300.0)
    return p.parse_args(argv), extra


def start_deployment(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "serve.cli", "--log-format", "json",
        "up", "--model", args.model, "--port", str(port), "--replicas", str(args.replicas),
        *args.server_arg,
    ]  # fmt: skip
    logger.info("starting: %s (log: %s)", " ".join(argv[2:]), log_path)
    log = log_path.open("w", encoding="utf-8")
    try:
        return subprocess.Popen(
            argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log.close()


def stop_deployment(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("deployment did not stop in %.0f s; killing it", timeout_s)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def locust_argv(args: argparse.Namespace, target: str, prefix: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "-H", target,
        "--headless", "--only-summary",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
        "--load-shape", args.shape,
        "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html",
        *extra,
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    name = args.name or f"{Path(args.model).name}-{args.shape}"
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / name
    port = args.port or free_port()
    target = f"127.0.0.1:{port}"
    proc = start_deployment(args, port, args.out / f"{name}.server.log")
    try:
        started = time.monotonic()
        asyncio.run(wait_serving(target, args.start_timeout, proc))
        logger.info("serving on %s after %.1f s", target, time.monotonic() - started)
        cmd = locust_argv(args, target, prefix, extra)
        logger.info("running: locust %s", " ".join(cmd[3:]))
        code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    finally:
        stop_deployment(proc)
    label = args.label or name
    report_code = report.main([f"{label}={prefix}", "--out", str(args.out)])
    logger.info("locust exited with %d; report in %s", code, args.out / "report.md")
    return code or report_code


if __name__ == "__main__":
    sys.exit(main())
