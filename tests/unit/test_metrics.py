"""serve.metrics and the gateway's request record: pure, no servers."""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serve.gateway.record import RequestRecord, log_fields
from serve.log import JsonFormatter
from serve.metrics import (
    GatewayMetrics,
    codec_counters_source,
    comm_totals,
    register_comm_stats,
    replica_registry,
    serve_metrics,
)


def samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape[(name, tuple(sorted(labels.items())))]


@dataclass(frozen=True)
class FakeStats:
    num_running: int = 2
    num_waiting: int = 1
    kv_blocks_free: int = 30
    kv_blocks_total: int = 40
    prefix_cache_query_tokens: int = 100
    prefix_cache_hit_tokens: int = 64
    num_preemptions: int = 3
    last_step_num_seqs: int = 2
    last_step_num_tokens: int = 17
    num_steps: int = 9


def test_record_feeds_histograms_and_counters() -> None:
    m = GatewayMetrics()
    record = RequestRecord("Chat", "tiny", m, arrival=10.0)
    record.admitted("r0", 12)
    record.add(0, prompt_tokens=12, queue_s=0.5, now=10.6)  # no token yet
    record.add(1, prompt_tokens=12, cached_prompt_tokens=8, queue_s=0.5, now=11.0)
    record.add(1, now=11.2)
    record.add(2, now=11.6)  # two tokens in one chunk: two gaps of 0.2 s
    record.finish("length", now=11.6)
    record.end()
    record.end()  # counted once

    s = samples(m.registry)
    assert value(s, "shardwire_time_to_first_token_seconds_count") == 1
    assert value(s, "shardwire_time_to_first_token_seconds_sum") == pytest.approx(1.0)
    assert value(s, "shardwire_inter_token_latency_seconds_count") == 3
    assert value(s, "shardwire_inter_token_latency_seconds_sum") == pytest.approx(0.6)
    assert value(s, "shardwire_e2e_request_latency_seconds_sum") == pytest.approx(1.6)
    assert value(s, "shardwire_request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(s, "shardwire_prompt_tokens_total") == 12
    assert value(s, "shardwire_cached_prompt_tokens_total") == 8
    assert value(s, "shardwire_generation_tokens_total") == 4
    assert value(s, "shardwire_requests_total", method="Chat", status="OK") == 1


def test_failed_record_counts_its_status_without_e2e() -> None:
    m = GatewayMetrics()
    record = RequestRecord("Translate", "tiny", m)
    record.fail("INVALID_ARGUMENT", "target_lang must be an ISO 639-1 language code")
    record.end()
    s = samples(m.registry)
    assert value(s, "shardwire_requests_total", method="Translate", status="INVALID_ARGUMENT") == 1
    assert value(s, "shardwire_e2e_request_latency_seconds_count") == 0
    assert value(s, "shardwire_time_to_first_token_seconds_count") == 0
    fields = log_fields(record)
    assert fields["status"] == "INVALID_ARGUMENT"
    assert fields["ttft_s"] is None
    assert "ISO 639-1" in fields["error"]


def test_gateway_registries_are_independent() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.generation_tokens.inc(5)
    assert value(samples(b.registry), "shardwire_generation_tokens_total") == 0


def test_engine_collector_reads_stats_at_scrape_time() -> None:
    current = [FakeStats()]
    registry = replica_registry(lambda: current[0])
    s = samples(registry)
    assert value(s, "shardwire_num_requests_running") == 2
    assert value(s, "shardwire_num_requests_waiting") == 1
    assert value(s, "shardwire_kv_cache_usage_ratio") == pytest.approx(0.25)
    assert value(s, "shardwire_prefix_cache_query_tokens_total") == 100
    assert value(s, "shardwire_prefix_cache_hit_tokens_total") == 64
    assert value(s, "shardwire_num_preemptions_total") == 3
    assert value(s, "shardwire_batch_size") == 2
    assert value(s, "shardwire_batch_num_tokens") == 17
    assert value(s, "shardwire_engine_steps_total") == 9
    current[0] = FakeStats(num_running=0, num_waiting=0, kv_blocks_free=40)
    s = samples(registry)
    assert value(s, "shardwire_batch_size") == 0
    assert value(s, "shardwire_kv_cache_usage_ratio") == 0


def test_comm_sources_add_up_per_codec_and_unregister() -> None:
    first = register_comm_stats(lambda: {"int8": (1000, 520), "none": (10, 10)})
    second = register_comm_stats(lambda: {"int8": (500, 260)})

    def broken() -> dict[str, tuple[int, int]]:
        raise RuntimeError("boom")

    third = register_comm_stats(broken)
    try:
        assert comm_totals()["int8"] == (1500, 780)
        s = samples(replica_registry(FakeStats))
        assert value(s, "shardwire_comm_raw_bytes_total", codec="int8") == 1500
        assert value(s, "shardwire_comm_wire_bytes_total", codec="int8") == 780
        assert value(s, "shardwire_comm_wire_bytes_total", codec="none") == 10
    finally:
        first(), second(), third()
    assert "int8" not in comm_totals()


def test_serve_metrics_on_a_free_port_and_off() -> None:
    assert serve_metrics(GatewayMetrics().registry, "127.0.0.1", -1) is None
    m = GatewayMetrics()
    m.requests.labels("Generate", "OK").inc(3)
    server = serve_metrics(m.registry, "127.0.0.1", 0)
    assert server is not None
    try:
        with urllib.request.urlopen(server.url, timeout=5) as response:
            body = response.read().decode()
        assert 'shardwire_requests_total{method="Generate",status="OK"} 3.0' in body
    finally:
        server.close()


def test_json_log_line_has_the_fields_and_no_text() -> None:
    record = RequestRecord("Generate", "tiny", None, request_id="abc-1", arrival=0.0)
    record.admitted("127.0.0.1:1", 5)
    record.add(1, prompt_tokens=5, now=0.25)
    record.finish("stop", now=0.5)
    entry = logging.LogRecord("serve.gateway.record", logging.INFO, __file__, 1, "m", (), None)
    entry.fields = log_fields(record)
    line = json.loads(JsonFormatter().format(entry))
    assert line["request_id"] == "abc-1"
    assert line["model"] == "tiny"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 1)
    assert line["ttft_s"] == 0.25 and line["total_s"] == 0.5
    assert line["status"] == "OK" and line["finish_reason"] == "stop"


def test_codec_counters_source_reads_a_live_mapping() -> None:
    @dataclass
    class Counters:
        raw_bytes: int = 0
        wire_bytes: int = 0

    by_codec: dict[str, Counters] = {}
    unregister = register_comm_stats(codec_counters_source(by_codec))
    try:
        assert "fp8" not in comm_totals()
        by_codec["fp8"] = Counters(2048, 1100)
        by_codec["fp8"].raw_bytes += 2048
        assert comm_totals()["fp8"] == (4096, 1100)
    finally:
        unregister()
