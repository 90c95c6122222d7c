"""Prometheus /metrics of an in-process gateway and replica under a known workload,
and the gateway's one log line per request.

The servers run on one event loop in a background thread; the workload goes
through the SDK and the metrics are scraped over HTTP, as Prometheus would."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.client import Chunk, Client
from serve.config import GatewayConfig, ShardConfig
from serve.gateway.app import start_gateway
from serve.log import JsonFormatter
from serve.metrics import register_comm_stats
from serve.shard.app import start_shard

SECRET = "purple-elephant-prompt"


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    gateway: str
    gateway_metrics: str
    shard_metrics: str


class Lines(logging.Handler):
    """Formats every record of one logger as JSON and keeps the lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="metrics-servers", daemon=True)
    thread.start()

    async def start() -> tuple[Any, Any]:
        shard = await start_shard(ShardConfig(port=0, metrics_port=0))
        config = GatewayConfig(
            port=0,
            replicas=(f"127.0.0.1:{shard.port}",),
            status_poll_interval_s=0.2,
            metrics_port=0,
        )
        return shard, await start_gateway(config)

    shard, gateway = asyncio.run_coroutine_threadsafe(start(), loop).result(120)
    assert gateway.metrics_port and shard.metrics_port
    yield Stack(
        loop,
        f"127.0.0.1:{gateway.port}",
        f"http://127.0.0.1:{gateway.metrics_port}/metrics",
        f"http://127.0.0.1:{shard.metrics_port}/metrics",
    )

    async def stop() -> None:
        await gateway.stop(0.5)
        await shard.stop(0.5)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(scrape_: dict, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in scrape_.items() if n == name and want <= set(lbls))


def drain(stream: Iterator[Chunk]) -> Chunk:
    last = None
    for last in stream:  # noqa: B007 - the last chunk is the result
        pass
    assert last is not None and last.usage is not None
    return last


def expect_error(code: grpc.StatusCode, stream: Iterator[Chunk]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        drain(stream)
    assert info.value.code() is code


def wait_for(url: str, name: str, expected: float, **labels: str) -> dict:
    """Scrapes until the counter reaches `expected` (server-side cancels land late)."""
    deadline = time.monotonic() + 10
    while True:
        s = scrape(url)
        if total(s, name, **labels) >= expected or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_counters_and_histograms_match_a_known_workload(stack: Stack) -> None:
    before = scrape(stack.gateway_metrics)
    lasts: list[Chunk] = []
    with Client(stack.gateway, timeout=30) as c:
        # N = 5 requests that end OK.
        lasts.append(drain(c.chat("Hello, how are you?", max_tokens=12, seed=1)))
        lasts.append(drain(c.translate("Good morning", source="en", target="de", max_tokens=9)))
        lasts.append(drain(c.generate("Once upon a time", max_tokens=7, ignore_eos=True)))
        lasts.append(drain(c.generate([257, 97, 98], max_tokens=5, ignore_eos=True)))
        lasts.append(drain(c.chat("Another question", max_tokens=10, seed=2)))
        # M = 4 rejected ones: 3 INVALID_ARGUMENT, 1 NOT_FOUND.
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.chat("hi", top_p=1.5))
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.translate("hi", target="xx"))
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.generate("hi", max_tokens=0))
        expect_error(grpc.StatusCode.NOT_FOUND, c.chat("hi", model="no-such-model"))
        # One stream cancelled after its first tokens.
        stream = c.generate("cancel me", max_tokens=500, ignore_eos=True)
        assert next(stream).token_ids and next(stream).token_ids
        stream.close()

    after = wait_for(stack.gateway_metrics, "shardwire_requests_total", 1, status="CANCELLED")

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    n_ok = len(lasts)
    assert delta("shardwire_requests_total", status="OK") == n_ok
    assert delta("shardwire_requests_total", status="INVALID_ARGUMENT") == 3
    assert delta("shardwire_requests_total", status="NOT_FOUND") == 1
    assert delta("shardwire_requests_total", status="CANCELLED") == 1
    assert delta("shardwire_requests_total") == n_ok + 4 + 1
    assert delta("shardwire_requests_total", method="Translate", status="INVALID_ARGUMENT") == 1
    # Every stream that produced a token, the cancelled one included.
    assert delta("shardwire_time_to_first_token_seconds_count") == n_ok + 1
    assert delta("shardwire_request_queue_time_seconds_count") == n_ok + 1
    assert delta("shardwire_e2e_request_latency_seconds_count") == n_ok
    ok_prompt = sum(last.usage.prompt_tokens for last in lasts)
    ok_completion = sum(last.usage.completion_tokens for last in lasts)
    cancelled_prompt = delta("shardwire_prompt_tokens_total") - ok_prompt
    cancelled_completion = delta("shardwire_generation_tokens_total") - ok_completion
    assert cancelled_prompt > 0  # "cancel me" after BOS
    assert 2 <= cancelled_completion < 500
    # One token per chunk: every token after a stream's first has an inter-token gap.
    assert delta("shardwire_inter_token_latency_seconds_count") == (
        ok_completion - n_ok + cancelled_completion - 1
    )
    assert total(after, "shardwire_requests_in_flight") == 0
    # Every request that reached a replica was routed; one replica: by load.
    routed = delta("shardwire_routing_decisions_total")
    assert n_ok + 1 <= routed <= n_ok + 4
    assert delta("shardwire_routing_decisions_total", reason="load") == routed
    replica = [k for k in after if k[0] == "shardwire_replica_healthy"]
    assert len(replica) == 1 and after[replica[0]] == 1


def test_replica_metrics_show_engine_state_and_prefix_cache(stack: Stack) -> None:
    before = scrape(stack.shard_metrics)
    turn = [{"role": "user", "content": "Tell me something long enough to fill blocks. " * 3}]
    with Client(stack.gateway, timeout=30) as c:
        answer = "".join(chunk.text for chunk in c.chat(turn, max_tokens=8, temperature=0.0))
        turn += [{"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
        last = drain(c.chat(turn, max_tokens=8, temperature=0.0))
    assert last.usage.cached_prompt_tokens > 0
    after = scrape(stack.shard_metrics)
    hits = total(after, "shardwire_prefix_cache_hit_tokens_total") - total(
        before, "shardwire_prefix_cache_hit_tokens_total"
    )
    queries = total(after, "shardwire_prefix_cache_query_tokens_total") - total(
        before, "shardwire_prefix_cache_query_tokens_total"
    )
    assert hits == last.usage.cached_prompt_tokens
    assert queries >= hits + last.usage.prompt_tokens - last.usage.cached_prompt_tokens
    assert 0.0 <= total(after, "shardwire_kv_cache_usage_ratio") <= 1.0
    assert total(after, "shardwire_kv_cache_blocks") > 0
    assert total(after, "shardwire_num_requests_running") == 0
    assert total(after, "shardwire_num_requests_waiting") == 0
    assert total(after, "shardwire_engine_steps_total") > total(
        before, "shardwire_engine_steps_total"
    )
    assert ("shardwire_batch_size", ()) in after


def test_replica_metrics_show_registered_comm_bytes(stack: Stack) -> None:
    unregister = register_comm_stats(lambda: {"int8+zstd": (4096, 1600)})
    try:
        s = scrape(stack.shard_metrics)
    finally:
        unregister()
    assert total(s, "shardwire_comm_raw_bytes_total", codec="int8+zstd") == 4096
    assert total(s, "shardwire_comm_wire_bytes_total", codec="int8+zstd") == 1600


def test_one_json_log_line_per_request_without_prompt_text(stack: Stack) -> None:
    handler = Lines()
    request_log = logging.getLogger("serve.gateway.record")
    old_level = request_log.level
    request_log.addHandler(handler)
    request_log.setLevel(logging.INFO)
    try:
        with Client(stack.gateway, timeout=30) as c:
            last = drain(c.generate(SECRET, max_tokens=6, ignore_eos=True))
            expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.chat(SECRET, temperature=-1.0))
    finally:
        request_log.removeHandler(handler)
        request_log.setLevel(old_level)
    assert len(handler.lines) == 2, handler.lines
    ok, bad = (json.loads(line) for line in handler.lines)
    assert ok["method"] == "Generate" and ok["status"] == "OK"
    assert ok["request_id"] and ok["model"] == "tiny"
    assert ok["prompt_tokens"] == last.usage.prompt_tokens
    assert ok["completion_tokens"] == 6
    assert ok["finish_reason"] == "length"
    assert 0 < ok["ttft_s"] <= ok["total_s"]
    assert bad["method"] == "Chat" and bad["status"] == "INVALID_ARGUMENT"
    assert bad["request_id"] != ok["request_id"]
    assert "temperature" in bad["error"]
    assert all(SECRET not in line for line in handler.lines)
