"""`shardwire up` as a real process tree, driven by the client CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from serve.launch import free_port, wait_serving

CLI = [sys.executable, "-m", "serve.cli"]


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "up", "--port", str(port), "--replicas", "2", "--kv-cache-mb", "64"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    target = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(target, 120, proc))
        yield target, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_chat_and_translate_stream_through_the_cli(deployment) -> None:
    target, _ = deployment
    chat = _cli("chat", "--target", target, "--max-tokens", "12", "--stats", "Hello there")
    assert chat.returncode == 0, chat.stderr
    assert "12 tokens" in chat.stderr or "stop" in chat.stderr
    tr = _cli(
        "translate", "--target", target, "--from", "en", "--to", "de", "--max-tokens", "8",
        "--stats", "Good morning",
    )  # fmt: skip
    assert tr.returncode == 0, tr.stderr
    assert "prompt" in tr.stderr


def test_models_lists_the_default_model(deployment) -> None:
    target, _ = deployment
    out = _cli("models", "--target", target)
    assert out.returncode == 0, out.stderr
    assert "tiny" in out.stdout


def test_bad_language_is_reported_with_its_status(deployment) -> None:
    target, _ = deployment
    out = _cli("translate", "--target", target, "--from", "en", "--to", "xx", "hi")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr
    assert "target_lang" in out.stderr


def test_repl_keeps_the_conversation(deployment) -> None:
    target, _ = deployment
    out = _cli(
        "chat", "--target", target, "--max-tokens", "4", "--stats", stdin="hi\nagain\n/exit\n"
    )
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stderr.splitlines() if "prompt" in line]
    assert len(stats) == 2
    # The second turn carries the first turn's history, so its prompt is longer.
    first, second = (int(s.split(" prompt")[0].split()[-1]) for s in stats)
    assert second > first


def test_sigint_stops_every_process(deployment) -> None:
    target, proc = deployment
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.returncode == 0
    out = proc.stdout.read() if proc.stdout else ""
    assert f"serving model 'tiny' on {target}" in out
    # No replica survives its launcher.
    ps = subprocess.run(["ps", "-o", "pid=", "-g", str(proc.pid)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
