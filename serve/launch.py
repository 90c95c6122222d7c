"""`shardwire up`: replica processes on loopback plus the gateway, in one command.

Each replica is a child process running `shardwire shard` per TP rank; the gateway
runs in this process once every replica reports SERVING. Children die with the
parent. A supervisor restarts the whole TP group of a replica when any of its ranks
exits (serve.supervisor); on SIGTERM the gateway drains, then the replicas stop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.config import (
    EngineConfig,
    GatewayConfig,
    LiveTranslateConfig,
    SessionConfig,
    ShardConfig,
    TPConfig,
)
from serve.errors import Unavailable
from serve.model.presets import is_preset
from serve.supervisor import ReplicaGroup, RestartPolicy, Supervisor, wait_group_serving

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchConfig:
    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 50051
    num_replicas: int = 1
    dtype: str = "float32"
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_threads: int = 0
    log_level: str = "info"
    log_format: str = "text"
    start_timeout_s: float = 180.0
    # Size and comm settings of every replica's TP group (rank and port are set per process).
    tp: TPConfig = field(default_factory=TPConfig)
    # Gateway /metrics port (0: a free one); each replica leader gets a free one; -1: all off.
    metrics_port: int = 0
    # Seconds the gateway (and each leader) lets calls in flight finish on SIGTERM.
    drain_timeout_s: float = 30.0
    # Restarts of replica groups whose ranks exit.
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    # Gateway limits of chat sessions and TranslateLive streams.
    sessions: SessionConfig = field(default_factory=SessionConfig)
    live: LiveTranslateConfig = field(default_factory=LiveTranslateConfig)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def shard_argv(cfg: ShardConfig, log_level: str, log_format: str) -> list[str]:
    e = cfg.engine
    return [
        sys.executable,
        "-m",
        "serve.cli",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        "shard",
        "--model",
        cfg.model,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--dtype",
        cfg.dtype,
        "--seed",
        str(cfg.seed),
        "--block-size",
        str(e.block_size),
        "--max-num-seqs",
        str(e.max_num_seqs),
        "--max-num-batched-tokens",
        str(e.max_num_batched_tokens),
        "--max-model-len",
        str(e.max_model_len),
        "--kv-cache-mb",
        str(e.kv_cache_bytes // (1024 * 1024)),
        "--num-threads",
        str(cfg.num_threads),
        "--tp-size",
        str(cfg.tp.size),
        "--tp-rank",
        str(cfg.tp.rank),
        "--master-addr",
        cfg.tp.master_addr,
        "--master-port",
        str(cfg.tp.master_port),
        "--tp-timeout",
        str(cfg.tp.timeout_s),
        "--comm-codec",
        cfg.tp.comm_codec,
        "--comm-accuracy",
        cfg.tp.comm_accuracy,
        "--comm-zstd-level",
        str(cfg.tp.comm_zstd_level),
        "--tp-overlap-chunks",
        str(cfg.tp.overlap_chunks),
        "--metrics-port",
        str(cfg.metrics_port),
        "--drain-timeout",
        str(cfg.drain_timeout_s),
        *([] if e.enable_prefix_caching else ["--no-prefix-caching"]),
    ]


async def wait_serving(target: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Polls grpc.health.v1 at target until SERVING."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise Unavailable(f"process for {target} exited with code {proc.returncode}")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise Unavailable(f"{target} not SERVING after {timeout_s:.0f} s")


class Deployment:
    """Replicas as child processes, the gateway in this process."""

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.groups: list[ReplicaGroup] = []
        self.replica_targets: list[str] = []
        # /metrics port of each replica leader (-1: off).
        self.replica_metrics_ports: list[int] = []
        self.gateway = None
        self.supervisor = Supervisor(self.groups, config.restart, config.start_timeout_s)

    @property
    def procs(self) -> list[subprocess.Popen]:
        """Every rank process of every replica, as running now."""
        return [p for g in self.groups for p in g.procs]

    @property
    def leaders(self) -> list[subprocess.Popen]:
        return [g.leader for g in self.groups]

    def _spawn_group(self, port: int, metrics_port: int) -> list[subprocess.Popen]:
        """Starts the ranks of one replica; a TP group gets a fresh master port."""
        c = self.config
        master_port = free_port(c.host) if c.tp.size > 1 else c.tp.master_port
        launcher = str(os.getpid())
        procs = []
        for rank in range(c.tp.size):
            tp = replace(c.tp, rank=rank, master_addr=c.host, master_port=master_port)
            shard = ShardConfig(
                model=c.model,
                host=c.host,
                port=port,
                dtype=c.dtype,
                seed=c.seed,
                engine=c.engine,
                num_threads=c.num_threads,
                tp=tp,
                metrics_port=metrics_port if rank == 0 else -1,
                drain_timeout_s=c.drain_timeout_s,
            )
            # No preexec_fn: a plain (v)fork+exec is safe beside gRPC's threads, and the
            # child arms its own parent-death signal from --launcher-pid.
            argv = [*shard_argv(shard, c.log_level, c.log_format), "--launcher-pid", launcher]
            procs.append(subprocess.Popen(argv))
        return procs

    async def start(self):  # -> GatewayServer
        from serve.gateway.app import start_gateway

        c = self.config
        for index in range(c.num_replicas):
            port = free_port(c.host)
            metrics_port = free_port(c.host) if c.metrics_port >= 0 else -1
            self.replica_metrics_ports.append(metrics_port)
            target = f"{c.host}:{port}"
            spawn = functools.partial(self._spawn_group, port, metrics_port)
            self.groups.append(ReplicaGroup(index, target, spawn))
            self.replica_targets.append(target)
        try:
            await asyncio.gather(*(wait_group_serving(g, c.start_timeout_s) for g in self.groups))
            gw = GatewayConfig(
                model=c.model,
                host=c.host,
                port=c.port,
                replicas=tuple(self.replica_targets),
                metrics_port=c.metrics_port,
                drain_timeout_s=c.drain_timeout_s,
                sessions=c.sessions,
                live=c.live,
            )
            self.gateway = await start_gateway(gw)
        except BaseException:
            self.stop_replicas()
            raise
        self.supervisor.start()
        return self.gateway

    def stop_replicas(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to the leaders first (each drains, then releases its other ranks),
        then to the ranks left; SIGKILL to any still running after timeout_s."""
        deadline = time.monotonic() + timeout_s
        for procs in (self.leaders, self.procs):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    async def stop(self) -> None:
        """Stops restarting, drains the gateway, then stops the replicas."""
        await self.supervisor.stop()
        if self.gateway is not None:
            drained = await self.gateway.drain(self.config.drain_timeout_s)
            await self.gateway.stop(1.0 if drained else 0.0)
        await asyncio.to_thread(self.stop_replicas)


async def run_up(config: LaunchConfig, demo: bool = False) -> int:
    """Starts everything, optionally shows a demo, serves until SIGINT/SIGTERM."""
    dep = Deployment(config)
    gateway = await dep.start()
    target = f"{config.host}:{gateway.port}"
    print(
        f"shardwire is serving model {config.model!r} on {target} "
        f"({config.num_replicas} replica(s) x TP {config.tp.size}); Ctrl-C stops it",
        flush=True,
    )
    if gateway.metrics_port is not None:
        urls = [f"gateway http://{config.host}:{gateway.metrics_port}/metrics"]
        urls += [
            f"replica {i} http://{config.host}:{port}/metrics"
            for i, port in enumerate(dep.replica_metrics_ports)
            if port >= 0
        ]
        print("metrics: " + ", ".join(urls), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if demo:
            await show_demo(target, random_weights=is_preset(config.model))
            print(
                f'\nstill serving on {target}; try: shardwire chat --target {target} "hi"',
                flush=True,
            )
        await stop.wait()
    finally:
        print("shutting down", flush=True)
        await dep.stop()
    return 0


async def show_demo(target: str, random_weights: bool) -> None:
    """Streams one chat answer and one translation through the public API."""
    from clients.client import AsyncClient

    async with AsyncClient(target) as client:
        print("\n>>> chat: 'Hello! What can you do?'", flush=True)
        async for chunk in client.chat(
            "Hello! What can you do?", max_tokens=48, temperature=0.8, seed=1
        ):
            print(chunk.text, end="", flush=True)
            last = chunk
        print(f"\n[finish: {last.finish_reason}, usage: {last.usage}]", flush=True)
        print("\n>>> translate en->de: 'The weather is nice today.'", flush=True)
        stream = client.translate(
            "The weather is nice today.",
            source="en",
            target="de",
            max_tokens=48,
            temperature=0.8,
            seed=2,
        )
        async for chunk in stream:
            print(chunk.text, end="", flush=True)
            last = chunk
        print(f"\n[finish: {last.finish_reason}, usage: {last.usage}]", flush=True)
    if random_weights:
        print(
            "(the built-in 'tiny' model has random weights, so its text is noise; "
            "serve a real checkpoint with --model PATH)",
            flush=True,
        )
