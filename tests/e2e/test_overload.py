"""Overload and oversized input against `shardwire up` as real processes (gateway in
the launcher process, one replica leader): a stream cap of 4, bursts beyond it,
and a gzip-compressed request that inflates past the receive limit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from shardwire.v1 import inference_pb2, inference_pb2_grpc

from clients.retry import retry_after_ms
from serve.launch import free_port, wait_serving

CLI = [sys.executable, "-m", "serve.cli", "--log-level", "warning"]
CAP = 4
EXCESS = 20
# Admitted streams decode this many tokens: long enough that every call of the
# burst arrives while they hold their slots.
LONG = 256
REJECT_WITHIN_S = 0.050


@dataclass
class Deployment:
    target: str
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "up", "--port", str(port), "--num-threads", "1", "--kv-cache-mb", "64",
         "--metrics-port", "-1", "--max-concurrent-streams", str(CAP)],
        start_new_session=True,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(target, 120, proc))
        yield Deployment(target, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def generate_request(max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt_token_ids=[1, 20, 30, 40, 50],
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=1),
    )


@dataclass
class Outcome:
    """One call of a burst as its client saw it."""

    code: grpc.StatusCode
    # From starting the call to its first event: the refusal, or the first chunk.
    first_event_s: float
    num_tokens: int = 0
    retry_after_ms: int | None = None


async def first_event(call: grpc.aio.UnaryStreamCall) -> tuple[float, object]:
    start = time.perf_counter()
    try:
        msg = await call.read()
    except grpc.aio.AioRpcError as error:
        return time.perf_counter() - start, error
    return time.perf_counter() - start, msg


async def finish(call: grpc.aio.UnaryStreamCall, seconds: float, first: object) -> Outcome:
    """Reads the rest of an admitted stream (after the burst's timing is taken)."""
    if isinstance(first, grpc.aio.AioRpcError):
        return Outcome(first.code(), seconds, retry_after_ms=retry_after_ms(first))
    num_tokens = 0
    msg = first
    while msg is not grpc.aio.EOF:
        num_tokens += len(msg.token_ids)  # type: ignore[attr-defined]
        msg = await call.read()
    return Outcome(await call.code(), seconds, num_tokens)


async def burst(target: str) -> list[Outcome]:
    """cap + 20 Generate calls started together from one asyncio client. Each call's
    first event is timed while nothing else is read, then the admitted streams are
    read to their end."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        warm = [c async for c in stub.Generate(generate_request(2), timeout=60)]
        assert warm[-1].finish_reason  # the connection is up before the burst
        calls = [stub.Generate(generate_request(LONG), timeout=120) for _ in range(CAP + EXCESS)]
        firsts = await asyncio.gather(*(first_event(c) for c in calls))
        return [await finish(c, s, f) for c, (s, f) in zip(calls, firsts, strict=True)]


def test_burst_beyond_the_stream_cap(deployment: Deployment) -> None:
    """Pass: in each of 3 bursts of cap + 20 = 24 concurrent Generate streams against a
    gateway with --max-concurrent-streams 4, exactly 20 calls end with
    RESOURCE_EXHAUSTED, each with a retry-after-ms hint in its trailing metadata, and
    the 4 admitted streams all complete with their 256 tokens (slots come back
    between bursts). Timing, from the client: each refused call's time from its
    start to its error (all 24 started together, nothing else read meanwhile) is
    under 50 ms for every refusal in at least 2 of the 3 bursts, and under 500 ms
    in all (these two cores are shared: one burst may meet a scheduling stall of
    another process; a refusal queued behind the admitted work would take longer
    than their ~1 s)."""
    slowest: list[float] = []
    for _ in range(3):
        outcomes = asyncio.run(burst(deployment.target))
        refused = [o for o in outcomes if o.code is grpc.StatusCode.RESOURCE_EXHAUSTED]
        admitted = [o for o in outcomes if o.code is grpc.StatusCode.OK]
        assert len(refused) == EXCESS, [o.code for o in outcomes]
        assert len(admitted) == CAP
        assert all(o.num_tokens == LONG for o in admitted)
        assert all(o.retry_after_ms is not None and o.retry_after_ms >= 50 for o in refused)
        slowest.append(max(o.first_event_s for o in refused))
    report = ", ".join(f"{s * 1000:.1f} ms" for s in slowest)
    print(f"slowest refusal per burst: {report}")
    assert sum(s < REJECT_WITHIN_S for s in slowest) >= 2, f"slowest refusal per burst: {report}"
    assert max(slowest) < 0.5, f"slowest refusal per burst: {report}"


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_gzip_bomb_request_is_refused(deployment: Deployment) -> None:
    """Pass: a Generate request holding 64 MiB of zeros, sent gzip-compressed (a few
    hundred KiB on the wire), ends with RESOURCE_EXHAUSTED (gRPC checks the receive
    limit, 1 MiB, against the decompressed size), the gateway process's peak resident
    memory grows by less than 16 MiB (it never inflated the message), and the next
    request succeeds."""
    before = peak_rss_kib(deployment.proc.pid)
    with grpc.insecure_channel(deployment.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        bomb = inference_pb2.GenerateRequest(prompt="0" * (64 << 20))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(bomb, compression=grpc.Compression.Gzip, timeout=60))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        del bomb
        chunks = list(stub.Generate(generate_request(4), timeout=60))
        assert sum(len(c.token_ids) for c in chunks) == 4
    grown = (peak_rss_kib(deployment.proc.pid) - before) * 1024
    assert grown < 16 << 20, f"gateway peak RSS grew by {grown >> 20} MiB"
