"""A replica leader process: model + engine + Shard gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from shardwire.v1 import shard_pb2_grpc

from serve.comm.collectives import Communicator
from serve.config import CLUSTER_SECRET_ENV, ShardConfig, TLSClientConfig
from serve.dist.worker import load_rank
from serve.engine.engine import AsyncEngine, LLMEngine
from serve.gateway.auth import cluster_secret_interceptor
from serve.gateway.drain import DrainGate
from serve.gateway.interceptor import ErrorInterceptor
from serve.gateway.router import MIN_PING_INTERVAL_MS, ChannelFactory, replica_channels
from serve.gateway.tls import describe, is_loopback, server_credentials
from serve.metrics import (
    MetricsServer,
    codec_counters_source,
    register_comm_stats,
    replica_registry,
    serve_metrics,
)
from serve.shard.kv_transfer import MAX_MESSAGE_BYTES, KvTransfer
from serve.shard.servicer import ShardServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = "shardwire.v1.Shard"
# How often run_shard looks at the engine, and how long failing streams get to
# deliver their UNAVAILABLE before a leader with a dead engine exits.
ENGINE_CHECK_S = 0.2
DEAD_ENGINE_GRACE_S = 1.0


@dataclass
class ShardServer:
    server: grpc.aio.Server
    engine: AsyncEngine
    health: health.aio.HealthServicer
    port: int
    metrics_server: MetricsServer | None = None
    drain_gate: DrainGate | None = None
    servicer: ShardServicer | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    async def drain(self, timeout_s: float) -> bool:
        """Health NOT_SERVING, new Generate calls refused with UNAVAILABLE (Status,
        Abort and health keep answering), and up to timeout_s for the requests in
        flight to finish; returns whether they all did. Status says `draining`, so a
        gateway with other replicas moves the requests there (live migration)."""
        if self.servicer is not None:
            self.servicer.draining = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.drain_gate is None:
            return True
        return await self.drain_gate.drain(timeout_s)

    async def stop(self, grace: float | None = None) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        if self.servicer is not None:
            await self.servicer.kv.close()
        await asyncio.to_thread(self.engine.shutdown)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.close)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def build_engine(config: ShardConfig) -> LLMEngine:
    """Runs on the engine thread (AsyncEngine.launch)."""
    model, channel = load_rank(config)
    comm = model.group.comm
    if isinstance(comm, Communicator):
        # Rank 0's activation bytes per codec, raw and on the wire, on /metrics.
        register_comm_stats(codec_counters_source(comm.stats.by_codec))
    return LLMEngine(model, config.engine, channel)


async def _watch_engine(engine: AsyncEngine, health_servicer: health.aio.HealthServicer) -> None:
    """Turns health NOT_SERVING once the engine loop dies (e.g. a TP rank is gone)."""
    while engine.is_alive:
        await asyncio.sleep(0.5)
    if engine.error is not None:
        logger.error("engine stopped: %s; reporting NOT_SERVING", engine.error)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


async def start_shard(config: ShardConfig) -> ShardServer:
    """Loads the model and serves Shard on config.host:config.port (0: any free port).

    With a cluster secret every call but health must carry it; with a client CA
    every peer must present a certificate signed by it (mutual TLS)."""
    credentials = server_credentials(config.tls)  # bad TLS files fail before the model loads
    auth = [cluster_secret_interceptor(config.cluster_secret)] if config.cluster_secret else []
    if not auth and not config.tls.client_ca_file and not is_loopback(config.host):
        logger.warning(
            "the Shard API binds %s and accepts any peer: set a cluster secret "
            "(--cluster-secret-file or %s) or mutual TLS (--tls-client-ca)",
            config.host,
            CLUSTER_SECRET_ENV,
        )
    engine = await AsyncEngine.launch(functools.partial(build_engine, config))
    drain_gate = DrainGate((f"/{SERVICE_NAME}/Generate",))
    server = grpc.aio.server(
        interceptors=[*auth, drain_gate, ErrorInterceptor()],
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # The gateway's and other replicas' keepalive pings (serve.gateway.router).
            ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    kv = KvTransfer(engine, peer_channels(config), config.prefix_fetch)
    servicer = ShardServicer(
        engine, config.model, config.dtype, config.tp.size, kv=kv, role=config.role
    )
    shard_pb2_grpc.add_ShardServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    asyncio.get_running_loop().create_task(_watch_engine(engine, health_servicer))
    logger.info(
        "shard serving %s on %s:%d (%s%s)",
        config.model,
        config.host,
        port,
        describe(config.tls),
        ", cluster secret" if config.cluster_secret else "",
    )
    metrics = serve_metrics(replica_registry(engine.stats), config.host, config.metrics_port)
    return ShardServer(server, engine, health_servicer, port, metrics, drain_gate, servicer)


def peer_channels(config: ShardConfig) -> ChannelFactory:
    """Channels to other replicas for KV moves: the cluster secret on every call and,
    when this leader serves TLS, TLS with its own certificate (its client CA as the
    peers' CA), as every replica of a cluster is set up alike."""
    tls = TLSClientConfig()
    if config.tls.enabled:
        tls = TLSClientConfig(
            ca_file=config.tls.client_ca_file,
            cert_file=config.tls.cert_file,
            key_file=config.tls.key_file,
        )
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    return replica_channels(tls, config.cluster_secret, options)


async def run_shard(config: ShardConfig) -> int:
    """Serves until SIGINT or SIGTERM (rank 0 of its TP group); returns the exit code.

    A stop drains: health turns NOT_SERVING, new calls are refused with UNAVAILABLE
    (a gateway retries them elsewhere) and requests in flight finish for up to
    config.drain_timeout_s, then the other ranks are released (0). When the engine
    dies instead (a rank died or hung), the streams have failed with UNAVAILABLE and
    the leader exits 1, so a supervisor or restart policy brings the group back."""
    shard = await start_shard(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set() and shard.engine.is_alive:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ENGINE_CHECK_S)
    if not shard.engine.is_alive:
        logger.error("engine died (%s); leaving so the TP group restarts", shard.engine.error)
        await shard.stop(grace=DEAD_ENGINE_GRACE_S)
        return 1
    logger.info("shard draining (at most %.0f s)", config.drain_timeout_s)
    drained = await shard.drain(config.drain_timeout_s)
    await shard.stop(grace=1.0 if drained else 0.0)
    logger.info("shard stopped")
    return 0
