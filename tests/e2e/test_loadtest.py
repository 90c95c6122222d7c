"""The locust suite, headless, against a live `shardwire up`; then the report.

One deployment for the module (its log in JSON); locust and report.py run as
subprocesses, exactly as `make loadtest` runs them."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve.launch import free_port, wait_serving
from tests.fixtures.certs import CertAuthority

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
REPORT = ROOT / "loadtests" / "report.py"
USERS = 4

# Only looked up: importing locust here would gevent-patch the test process.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None or importlib.util.find_spec("matplotlib") is None,
    reason="needs the loadtest extra (locust, matplotlib)",
)


@dataclass
class Deployment:
    target: str
    proc: subprocess.Popen
    log: Path

    def gateway_metrics_url(self) -> str:
        """From the launcher's `metrics: gateway http://...` line."""
        text = self.log.read_text(encoding="utf-8")
        match = re.search(r"metrics: gateway (http://\S+/metrics)", text)
        assert match, text[-2000:]
        return match.group(1)


@contextlib.contextmanager
def _up(log: Path, *extra: str, ready: Callable[[str], None] | None = None) -> Iterator[Deployment]:
    """`shardwire up` (tiny model) until the block ends; `ready` waits for it to
    serve (default: a plaintext health check)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "serve.cli", "--log-format", "json",
        "up", "--port", str(port), "--kv-cache-mb", "64", *extra,
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    target = f"127.0.0.1:{port}"
    try:
        if ready is None:
            asyncio.run(wait_serving(target, 120, proc))
        else:
            ready(target)
        yield Deployment(target, proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with _up(tmp_path_factory.mktemp("up") / "up.log") as running:
        yield running


def locust(target: str, prefix: Path, run_time: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "-H", target,
        "--headless", "--only-summary", "-u", str(USERS), "-r", str(USERS), "-t", run_time,
        "--csv", str(prefix), "--csv-full-history", "--html", f"{prefix}.html", *extra,
    ]  # fmt: skip
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_locust_run_reports_ttft_itl_and_e2e_rows_and_the_report(
    deployment: Deployment, tmp_path: Path
) -> None:
    prefix = tmp_path / "run"
    run = locust(deployment.target, prefix, "20s", "--slo-error-rate", "0")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    rows = read_rows(tmp_path / "run_stats.csv")
    kinds = {(r["Type"], r["Name"]): r for r in rows if r["Name"] != "Aggregated"}
    for kind in ("TTFT", "ITL", "E2E"):
        mine = [r for (k, _), r in kinds.items() if k == kind]
        assert mine, f"no {kind} rows in {sorted(kinds)}"
        assert sum(int(r["Request Count"]) for r in mine) > 0
        assert all(int(r["Failure Count"]) == 0 for r in mine)
    tasks = {name for (kind, name) in kinds if kind == "E2E"}
    assert tasks <= {"chat", "translate_short", "translate_long", "generate"}
    assert "chat" in tasks
    assert read_rows(tmp_path / "run_failures.csv") == []
    assert (tmp_path / "run.html").stat().st_size > 0

    # The gateway counted what locust saw (users stopped mid-call add a few cancels).
    e2e_calls = sum(int(r["Request Count"]) for (k, _), r in kinds.items() if k == "E2E")
    metrics = scrape(deployment.gateway_metrics_url())
    ok = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("shardwire_requests_total{") and 'status="OK"' in line
    )
    assert e2e_calls <= ok <= e2e_calls + USERS

    # One JSON line per call in the deployment's log, without prompt text.
    lines = [
        json.loads(line)
        for line in deployment.log.read_text(encoding="utf-8").splitlines()
        if line.startswith("{") and '"event": "request"' in line
    ]
    assert sum(1 for line in lines if line["status"] == "OK") == ok
    assert all(
        {"request_id", "model", "prompt_tokens", "completion_tokens"} <= set(x) for x in lines
    )
    assert not any("Translate the following text" in json.dumps(x) for x in lines)

    report = subprocess.run(
        [sys.executable, str(REPORT), str(prefix), "--out", str(tmp_path / "report"), "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| config | run | task | calls |" in text
    assert "| config | users | calls |" in text
    assert "| run | run | chat |" in text
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert pngs, "no plot written"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missed_slo_fails_the_headless_run(deployment: Deployment, tmp_path: Path) -> None:
    run = locust(deployment.target, tmp_path / "slo", "4s", "--slo-ttft-p95-ms", "0.001")
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "SLO missed: TTFT p95" in run.stderr


API_KEY = "loadtest-key-3f9a1c7e52"


def _probe(target: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "serve.cli", "probe", "--target", target, *extra]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_locust_and_probe_reach_a_gateway_with_tls_and_api_keys(tmp_path: Path) -> None:
    """The locust user and `shardwire probe` speak TLS (trusting the given CA) and
    the locust user sends the API key: a run with both has no failure, one without
    the key fails every call; the probe fails on plaintext and passes with TLS."""
    ca = CertAuthority(tmp_path)
    server = ca.issue("server", server=True)
    tls = ("--tls-ca", str(ca.cert))

    def ready(target: str) -> None:
        deadline = time.monotonic() + 120
        while _probe(target, *tls).returncode != 0:
            assert time.monotonic() < deadline, "the TLS deployment did not come up"
            time.sleep(0.5)

    secured = ("--api-key", API_KEY, "--tls-cert", str(server.cert), "--tls-key", str(server.key))
    with _up(tmp_path / "up.log", *secured, ready=ready) as running:
        assert _probe(running.target, "--timeout", "3").returncode == 1  # plaintext
        gateway_tls = ("--gateway-ca", str(ca.cert))
        with_key = locust(
            running.target, tmp_path / "key", "5s", *gateway_tls, "--api-key", API_KEY
        )
        assert with_key.returncode == 0, with_key.stderr[-3000:]
        rows = [r for r in read_rows(tmp_path / "key_stats.csv") if r["Name"] != "Aggregated"]
        assert sum(int(r["Request Count"]) for r in rows if r["Type"] == "E2E") > 0
        assert all(int(r["Failure Count"]) == 0 for r in rows)
        without = locust(running.target, tmp_path / "nokey", "4s", *gateway_tls)
        failures = read_rows(tmp_path / "nokey_failures.csv")
        assert failures and all("UNAUTHENTICATED" in f["Error"] for f in failures), without.stderr
        rows = [r for r in read_rows(tmp_path / "nokey_stats.csv") if r["Type"] == "E2E"]
        assert sum(int(r["Failure Count"]) for r in rows) > 0
