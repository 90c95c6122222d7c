"""Prometheus metrics of the gateway and of each replica leader.

Every server object owns a `CollectorRegistry`, so several servers in one
process (tests, `shardwire up`'s in-process gateway) never share series. Names
are prefixed `shardwire_` and use base units (seconds, bytes, tokens).

- Gateway (`GatewayMetrics`): one request's life as the client sees it —
  latency histograms, token and request counters, in-flight gauge.
- Replica leader (`replica_registry`): engine state read at scrape time from
  `EngineStats` (the engine thread is never asked to push), plus the raw and
  wire bytes of every codec the TP communication layer reports through
  `register_comm_stats`.

This module imports neither grpc nor torch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

# Seconds. Fine steps below 0.1 s for CPU and small models, coarse ones up to minutes.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
    20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class GatewayMetrics:
    """The gateway's request metrics, in a registry of their own.

    Histograms count every request that got that far: TTFT and queue time once
    per stream that produced a token, inter-token latency once per generated
    token after the first, end-to-end latency once per request that ended OK.
    `requests_total` counts every inference call once, by its final status."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "shardwire_time_to_first_token_seconds",
            "Seconds from arrival at the gateway to the first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "shardwire_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of one stream, per token.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e_request_latency = Histogram(
            "shardwire_e2e_request_latency_seconds",
            "Seconds from arrival at the gateway to the last token, requests that ended OK.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_queue_time = Histogram(
            "shardwire_request_queue_time_seconds",
            "Seconds a request waited on its replica before its first forward pass.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "shardwire_prompt_tokens_total",
            "Prompt tokens of requests whose prefill completed (cached ones included).",
            registry=r,
        )
        self.generation_tokens = Counter(
            "shardwire_generation_tokens_total",
            "Tokens generated and streamed back.",
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "shardwire_cached_prompt_tokens_total",
            "Prompt tokens whose KV came from a replica's prefix cache.",
            registry=r,
        )
        self.requests = Counter(
            "shardwire_requests_total",
            "Inference calls by method and final gRPC status code.",
            ("method", "status"),
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "shardwire_requests_in_flight",
            "Inference calls being handled by the gateway now.",
            registry=r,
        )

    def register(self, collector: Any) -> None:
        """Adds a scrape-time collector (e.g. replica health) to this registry."""
        self.registry.register(collector)


class StatsSource(Protocol):
    """What the replica collector reads; `serve.engine.engine.EngineStats` fits."""

    num_running: int
    num_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    prefix_cache_query_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int
    last_step_num_seqs: int
    last_step_num_tokens: int
    num_steps: int


class EngineCollector:
    """Engine gauges and counters, read from one `stats()` call per scrape.

    `stats` runs on the HTTP server's thread; `LLMEngine.stats` only reads
    lengths and integers, which is safe beside the engine thread."""

    def __init__(self, stats: Callable[[], StatsSource]) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        # The engine thread notices idleness up to one poll later; an empty engine has no batch.
        idle = s.num_running == 0 and s.num_waiting == 0
        yield _gauge(
            "shardwire_num_requests_running",
            "Requests holding KV blocks in the running batch.",
            s.num_running,
        )
        yield _gauge(
            "shardwire_num_requests_waiting",
            "Requests queued for admission (new or preempted).",
            s.num_waiting,
        )
        yield _gauge(
            "shardwire_batch_size",
            "Sequences (decodes plus prefill chunks) in the last engine step; 0 when idle.",
            0 if idle else s.last_step_num_seqs,
        )
        yield _gauge(
            "shardwire_batch_num_tokens",
            "Tokens computed in the last engine step; 0 when idle.",
            0 if idle else s.last_step_num_tokens,
        )
        total = max(s.kv_blocks_total, 1)
        yield _gauge(
            "shardwire_kv_cache_usage_ratio",
            "Fraction of KV-cache blocks held by requests (0 to 1).",
            (s.kv_blocks_total - s.kv_blocks_free) / total,
        )
        yield _gauge("shardwire_kv_cache_blocks", "KV-cache blocks in the pool.", s.kv_blocks_total)
        yield _counter(
            "shardwire_prefix_cache_query_tokens_total",
            "Prompt tokens looked up in the prefix cache.",
            s.prefix_cache_query_tokens,
        )
        yield _counter(
            "shardwire_prefix_cache_hit_tokens_total",
            "Prompt tokens found in the prefix cache.",
            s.prefix_cache_hit_tokens,
        )
        yield _counter(
            "shardwire_num_preemptions_total",
            "Requests preempted because KV blocks ran out.",
            s.num_preemptions,
        )
        yield _counter(
            "shardwire_engine_steps_total", "Engine steps that ran a batch.", s.num_steps
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


# -- communication bytes, reported by the TP layer ----------------------------------

CommSource = Callable[[], Mapping[str, tuple[int, int]]]
_comm_sources: list[CommSource] = []
_comm_lock = threading.Lock()


def register_comm_stats(source: CommSource) -> Callable[[], None]:
    """Makes a process's codec byte counts visible on every replica registry.

    `source()` returns `{codec: (raw_bytes, wire_bytes)}`, both cumulative since
    the process started; it is called at scrape time from the HTTP thread, so it
    must only read. Counts of several sources add up per codec. Returns a
    function that removes the source again."""
    with _comm_lock:
        _comm_sources.append(source)

    def unregister() -> None:
        with _comm_lock:
            if source in _comm_sources:
                _comm_sources.remove(source)

    return unregister


def codec_counters_source(by_codec: Mapping[str, Any]) -> CommSource:
    """A source over a live `{codec: counters}` mapping whose values have
    `raw_bytes` and `wire_bytes` (e.g. `CommStats.by_codec` of serve.comm)."""

    def read() -> dict[str, tuple[int, int]]:
        items = list(by_codec.items())  # one C-level copy; the comm thread may add codecs
        return {codec: (int(c.raw_bytes), int(c.wire_bytes)) for codec, c in items}

    return read


def comm_totals() -> dict[str, tuple[int, int]]:
    """{codec: (raw, wire)} summed over the registered sources."""
    with _comm_lock:
        sources = list(_comm_sources)
    totals: dict[str, tuple[int, int]] = {}
    for source in sources:
        try:
            counts = source()
        except Exception:  # a broken source must not break the scrape
            logger.exception("comm stats source failed")
            continue
        for codec, (raw, wire) in counts.items():
            r0, w0 = totals.get(codec, (0, 0))
            totals[codec] = (r0 + int(raw), w0 + int(wire))
    return totals


class CommCollector:
    """`shardwire_comm_raw_bytes_total` / `..._wire_bytes_total` by codec; their
    ratio is the live compression ratio of the TP and KV traffic."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        raw = CounterMetricFamily(
            "shardwire_comm_raw_bytes_total",
            "Bytes handed to the communication layer before encoding, by codec.",
            labels=("codec",),
        )
        wire = CounterMetricFamily(
            "shardwire_comm_wire_bytes_total",
            "Bytes sent on the wire after encoding, by codec.",
            labels=("codec",),
        )
        for codec, (r, w) in sorted(comm_totals().items()):
            raw.add_metric((codec,), r)
            wire.add_metric((codec,), w)
        yield raw
        yield wire


def replica_registry(stats: Callable[[], StatsSource]) -> CollectorRegistry:
    """A registry with the engine and comm collectors of one replica leader."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(stats))
    registry.register(CommCollector())
    return registry


# -- HTTP ----------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """`/metrics` over HTTP on a daemon thread."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
    """Serves `registry` on host:port (0: a free port); None when port is negative."""
    if port < 0:
        return None
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address[1]
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(server, thread, host, bound)
