"""A replica leader process: model + engine + Shard gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from shardwire.v1 import shard_pb2_grpc

from serve.config import ShardConfig
from serve.engine.engine import AsyncEngine, LLMEngine
from serve.gateway.interceptor import ErrorInterceptor
from serve.model.loader import load_model
from serve.shard.servicer import ShardServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = "shardwire.v1.Shard"


@dataclass
class ShardServer:
    server: grpc.aio.Server
    engine: AsyncEngine
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace: float | None = None) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await asyncio.to_thread(self.engine.shutdown)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def build_engine(config: ShardConfig) -> AsyncEngine:
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    model = load_model(config.model, dtype=config.dtype, seed=config.seed)
    return AsyncEngine(LLMEngine(model, config.engine))


async def start_shard(config: ShardConfig) -> ShardServer:
    """Loads the model and serves Shard on config.host:config.port (0: any free port)."""
    engine = await asyncio.to_thread(build_engine, config)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[("grpc.so_reuseport", 0)])
    shard_pb2_grpc.add_ShardServicer_to_server(
        ShardServicer(engine, config.model, config.dtype), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("shard serving %s on %s:%d", config.model, config.host, port)
    return ShardServer(server, engine, health_servicer, port)


async def run_shard(config: ShardConfig) -> None:
    """Serves until SIGINT or SIGTERM."""
    shard = await start_shard(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shard stopping")
    await shard.stop(grace=5)
