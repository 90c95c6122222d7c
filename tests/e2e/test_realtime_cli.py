"""The client CLI's real-time commands against `shardwire up` in a real process:
the chat REPL on a gateway session, and `translate --live` reading stdin."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from serve.launch import free_port, wait_serving

CLI = [sys.executable, "-m", "serve.cli"]
STATS = re.compile(r"\[(\w+); (\d+) prompt \((\d+) cached\) \+ (\d+) tokens")


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "up", "--port", str(port), "--kv-cache-mb", "32", "--metrics-port", "-1",
         "--live-max-pending", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(address, 120, proc))
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def _stats(stderr: str) -> list[tuple[int, int, int]]:
    """(prompt, cached, completion) tokens of each --stats line."""
    return [(int(p), int(c), int(n)) for _, p, c, n in STATS.findall(stderr)]


def test_repl_sends_only_new_turns_on_a_session(target: str) -> None:
    out = _cli(
        "chat", "--target", target, "--max-tokens", "8", "--temperature", "0", "--stats",
        stdin="Hello there, how are you?\nTell me more about it.\nAnd then?\n/exit\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    sessions = re.findall(r"\[session ([0-9a-f]{32})\]", out.stderr)
    assert len(sessions) == 1
    stats = _stats(out.stderr)
    assert len(stats) == 3
    # Each turn's prompt is the whole conversation; the earlier turns come from the cache.
    assert stats[0][0] < stats[1][0] < stats[2][0]
    assert all(cached > 0 for _, cached, _ in stats[1:])
    assert stats[2][0] - stats[2][1] < stats[2][0] / 2


def test_repl_without_session_resends_the_history(target: str) -> None:
    out = _cli(
        "chat", "--target", target, "--max-tokens", "4", "--stats", "--no-session",
        stdin="hi\nagain\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "[session" not in out.stderr
    first, second = _stats(out.stderr)
    assert second[0] > first[0]


def test_repl_on_an_unknown_session_reports_not_found(target: str) -> None:
    out = _cli("chat", "--target", target, "--session", "f" * 32, stdin="hi\n")
    assert out.returncode == 1
    assert "NOT_FOUND" in out.stderr and "session_id" in out.stderr


def test_translate_live_prints_each_segment_as_it_streams(target: str) -> None:
    lines = [f"Line {i} of the subtitles, spoken slowly." for i in range(5)]
    out = _cli(
        "translate", "--live", "--target", target, "--from", "en", "--to", "de",
        "--max-tokens", "6", "--temperature", "0", "--stats",
        stdin="\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    stats = _stats(out.stderr)
    assert len(stats) == 5  # the empty line is skipped
    assert all(n > 0 for _, _, n in stats)
    assert all(cached > 0 for _, cached, _ in stats[1:])
    assert out.stdout.count("\n") >= 5


def test_translate_live_refuses_text_arguments(target: str) -> None:
    out = _cli("translate", "--live", "--target", target, "--to", "de", "hello")
    assert out.returncode == 2
    assert "--live reads the segments from stdin" in out.stderr
    out = _cli("translate", "--target", target, "--to", "de")
    assert out.returncode == 2


def test_translate_live_bad_language(target: str) -> None:
    out = _cli("translate", "--live", "--target", target, "--to", "xx", stdin="hello\n")
    assert out.returncode == 1
    assert "INVALID_ARGUMENT" in out.stderr and "config.target_lang" in out.stderr
