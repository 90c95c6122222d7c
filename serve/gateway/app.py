"""Gateway process: the Inference service plus health and reflection, on grpc.aio,
and Prometheus /metrics over HTTP when a metrics port is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from shardwire.v1 import inference_pb2, inference_pb2_grpc, shard_pb2_grpc

from serve.config import GatewayConfig
from serve.errors import InvalidArgument
from serve.gateway.admin import ADMIN_SERVICE, AdminServicer, check_kv_codec
from serve.gateway.admission import Limits
from serve.gateway.auth import api_key_interceptor
from serve.gateway.drain import DrainGate
from serve.gateway.interceptor import ErrorInterceptor
from serve.gateway.migration import Migrator
from serve.gateway.router import Router, replica_channels
from serve.gateway.servicer import InferenceServicer
from serve.gateway.tls import describe, server_credentials
from serve.metrics import GatewayMetrics, MetricsServer, serve_metrics
from serve.model.presets import is_preset
from serve.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
HEALTH_SERVICES = ("", INFERENCE_SERVICE)
# Largest response message (a chunk of streamed text is far smaller).
MAX_RESPONSE_BYTES = 4 << 20


def load_tokenizer(model: str) -> Tokenizer:
    """A preset name gets the built-in tokenizer; anything else is a model folder."""
    if is_preset(model):
        return Tokenizer.builtin()
    if not Path(model).is_dir():
        raise InvalidArgument(f"model {model!r} is neither a preset nor a folder")
    return Tokenizer.from_pretrained(model)


def served_model_id(config: GatewayConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    if is_preset(config.model):
        return config.model
    return Path(config.model).resolve().name


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ReplicaCollector:
    """Replica health and outstanding load as the router sees them, at scrape time."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily(
            "shardwire_replica_healthy",
            "1 when the replica answered its last Status poll and reports SERVING.",
            labels=("replica",),
        )
        outstanding = GaugeMetricFamily(
            "shardwire_replica_outstanding_tokens",
            "Prompt and max_tokens of this gateway's requests still running on the replica.",
            labels=("replica",),
        )
        for replica in self._router.replicas:
            healthy.add_metric((replica.address,), 1.0 if replica.is_healthy else 0.0)
            outstanding.add_metric((replica.address,), replica.outstanding_tokens)
        yield healthy
        yield outstanding
        decisions = CounterMetricFamily(
            "shardwire_routing_decisions",
            "Requests routed, by why the replica was chosen: session (the session's "
            "replica), prefix (the replica holding the prompt's prefix) or load.",
            labels=("reason",),
        )
        for reason, count in self._router.decisions.items():
            decisions.add_metric((reason,), count)
        yield decisions
        prefixes = self._router.prefixes
        yield GaugeMetricFamily(
            "shardwire_prefix_index_blocks",
            "Prompt blocks the router remembers for prefix affinity.",
            value=len(prefixes) if prefixes is not None else 0,
        )


class GatewayServer:
    """A started gateway; `port` is the bound port, `metrics_port` the /metrics port
    (None when metrics are off)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        router: Router,
        health_servicer: health.aio.HealthServicer,
        port: int,
        model_id: str,
        metrics: GatewayMetrics | None = None,
        metrics_server: MetricsServer | None = None,
        drain_gate: DrainGate | None = None,
    ) -> None:
        self._server = server
        self._drain_gate = drain_gate
        self._router = router
        self._health = health_servicer
        self.port = port
        self.model_id = model_id
        self.metrics = metrics
        self._metrics_server = metrics_server
        self.metrics_port = metrics_server.port if metrics_server is not None else None

    @property
    def router(self) -> Router:
        return self._router

    async def drain(self, timeout_s: float) -> bool:
        """Health NOT_SERVING, new inference calls refused with UNAVAILABLE, and up to
        timeout_s for the calls in flight to finish; returns whether they all did."""
        await self._health.enter_graceful_shutdown()
        if self._drain_gate is None:
            return True
        return await self._drain_gate.drain(timeout_s)

    async def stop(self, grace: float | None = None) -> None:
        """Stops accepting calls, lets running ones finish for `grace` seconds."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self._router.close()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
        logger.info("gateway on port %d stopped", self.port)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def start_gateway(config: GatewayConfig) -> GatewayServer:
    """Binds the port, then waits until a replica answers Status (Unavailable after
    config.startup_timeout_s)."""
    credentials = server_credentials(config.tls)  # bad TLS files fail before anything starts
    tokenizer = await asyncio.to_thread(load_tokenizer, config.model)
    model_id = served_model_id(config)
    health_servicer = health.aio.HealthServicer()

    async def on_health_change(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        if serving:
            status = health_pb2.HealthCheckResponse.SERVING
        for name in HEALTH_SERVICES:
            await health_servicer.set(name, status)

    router = Router(
        config.replicas,
        poll_interval_s=config.status_poll_interval_s,
        on_health_change=on_health_change,
        open_channel=replica_channels(
            config.replica_tls,
            config.cluster_secret,
            keepalive_s=config.replica_keepalive_s,
            keepalive_timeout_s=config.replica_keepalive_timeout_s,
        ),
        prefix_affinity=config.prefix_affinity,
    )
    router.kv_codec = check_kv_codec(config.kv_codec) or router.kv_codec
    migrator = Migrator(router)
    drain_gate = DrainGate((f"/{INFERENCE_SERVICE}/",))
    server = grpc.aio.server(
        # Auth first: a refused call learns nothing about drain or overload state.
        interceptors=[
            *([api_key_interceptor(config.api_keys)] if config.api_keys else []),
            drain_gate,
            ErrorInterceptor(),
        ],
        options=[
            # gRPC checks this against the decompressed size, and stops inflating a
            # compressed message there: a small gzip bomb gets RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    metrics = GatewayMetrics()
    metrics.register(ReplicaCollector(router))
    servicer = InferenceServicer(
        tokenizer=tokenizer,
        router=router,
        model_id=model_id,
        limits=Limits.from_config(config),
        log_prompts=config.log_prompts,
        metrics=metrics,
        sessions=config.sessions,
        live=config.live,
    )
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    shard_pb2_grpc.add_AdminServicer_to_server(AdminServicer(migrator), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = _address(config.host, config.port)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await on_health_change(False)
    await server.start()
    metrics_server = None
    try:
        metrics_server = serve_metrics(metrics.registry, config.host, config.metrics_port)
        await router.start()
        await router.wait_ready(config.startup_timeout_s)
    except BaseException:
        await server.stop(None)
        await router.close()
        if metrics_server is not None:
            metrics_server.close()
        raise
    logger.info(
        "gateway listening on %s (%s, %s), model %s, replicas %s (%s%s)",
        _address(config.host, port),
        describe(config.tls),
        f"{len(config.api_keys)} API key(s)" if config.api_keys else "no API keys",
        model_id,
        ", ".join(config.replicas),
        "TLS" if config.replica_tls.enabled else "plaintext",
        ", cluster secret" if config.cluster_secret else "",
    )
    return GatewayServer(
        server, router, health_servicer, port, model_id, metrics, metrics_server, drain_gate
    )


async def run_gateway(config: GatewayConfig, grace_s: float = 1.0) -> None:
    """Starts the gateway and serves until SIGINT or SIGTERM, then drains: calls in
    flight get up to config.drain_timeout_s, new ones are refused with UNAVAILABLE."""
    gateway = await start_gateway(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stopping.set)
            installed.append(sig)
    terminated = asyncio.create_task(gateway.wait_for_termination())
    stop_requested = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({terminated, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        stop_requested.cancel()
        logger.info("shutting down the gateway")
        drained = await gateway.drain(config.drain_timeout_s)
        await gateway.stop(grace_s if drained else 0.0)
        terminated.cancel()
