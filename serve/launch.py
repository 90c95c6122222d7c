"""`shardwire up`: replica processes on loopback plus the gateway, in one command.

Each replica is a child process running `shardwire shard` per TP rank; the gateway
runs in this process once every replica reports SERVING. Children die with the
parent. A supervisor restarts the whole TP group of a replica when any of its ranks
exits (serve.supervisor); on SIGTERM the gateway drains, then the replicas stop.

The replicas' internal ports (Shard API, TP rendezvous and gloo, /metrics) bind to
`bind_host`, loopback by default. The gateway and the replica leaders share a
cluster secret, random unless one is given; the children get it through their
environment, never on a command line.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import ipaddress
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.config import (
    CLUSTER_SECRET_ENV,
    EngineConfig,
    GatewayConfig,
    LiveTranslateConfig,
    PrefixAffinityConfig,
    SessionConfig,
    ShardConfig,
    TLSServerConfig,
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
    # Gateway overload caps (0: none).
    max_concurrent_streams: int = GatewayConfig.max_concurrent_streams
    max_queued_prompt_tokens: int = GatewayConfig.max_queued_prompt_tokens
    # Interface of the replicas' internal ports (the gateway binds `host`).
    bind_host: str = "127.0.0.1"
    # Gateway API keys (empty: none) and TLS of the gateway's port.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    tls: TLSServerConfig = field(default_factory=TLSServerConfig)
    # Shared by the gateway and the replica leaders; empty: a random one per launch.
    cluster_secret: str = field(default="", repr=False)
    # Interface of the TP ranks' gloo sockets (GLOO_SOCKET_IFNAME); empty: bind_host's.
    tp_socket_ifname: str = ""
    # Role of each replica (both, prefill, decode); fewer than replicas: the rest "both".
    roles: tuple[str, ...] = ()
    # KV codec of the moves the gateway orchestrates.
    kv_codec: str = "lossless"
    # Routing of requests without a session_id by their prompt's prefix.
    prefix_affinity: PrefixAffinityConfig = field(default_factory=PrefixAffinityConfig)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def local_address(bind_host: str) -> str:
    """Where processes on this host reach a port bound to `bind_host`."""
    if bind_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if bind_host in ("::", "[::]"):
        return "::1"
    return bind_host


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def interface_of(address: str) -> str | None:
    """The network interface holding IPv4 `address` (any loopback address: the
    loopback interface); None when none does or it cannot be told (not Linux)."""
    try:
        packed = socket.inet_aton(address)
    except OSError:
        return None
    loopback = ipaddress.ip_address(address).is_loopback
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(s.fileno(), siocgifaddr, request)
            except OSError:  # no IPv4 address on it
                continue
            found = reply[20:24]
            if found == packed or (loopback and ipaddress.ip_address(found).is_loopback):
                return name
    return None


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
        "--tp-transport",
        cfg.tp.transport,
        "--metrics-port",
        str(cfg.metrics_port),
        "--drain-timeout",
        str(cfg.drain_timeout_s),
        "--role",
        cfg.role,
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
        self.cluster_secret = config.cluster_secret or secrets.token_urlsafe(32)
        # Where the gateway and the ranks reach the replicas' ports.
        self.internal_host = local_address(config.bind_host)
        self._child_env = {**os.environ, CLUSTER_SECRET_ENV: self.cluster_secret}
        ifname = config.tp_socket_ifname or interface_of(self.internal_host)
        if config.tp.size > 1 and ifname:
            self._child_env["GLOO_SOCKET_IFNAME"] = ifname

    @property
    def procs(self) -> list[subprocess.Popen]:
        """Every rank process of every replica, as running now."""
        return [p for g in self.groups for p in g.procs]

    @property
    def leaders(self) -> list[subprocess.Popen]:
        return [g.leader for g in self.groups]

    def _spawn_group(
        self, port: int, metrics_port: int, role: str = "both"
    ) -> list[subprocess.Popen]:
        """Starts the ranks of one replica; a TP group gets a fresh master port."""
        c = self.config
        master_port = free_port(c.bind_host) if c.tp.size > 1 else c.tp.master_port
        launcher = str(os.getpid())
        procs = []
        for rank in range(c.tp.size):
            tp = replace(c.tp, rank=rank, master_addr=self.internal_host, master_port=master_port)
            shard = ShardConfig(
                model=c.model,
                host=c.bind_host,
                port=port,
                dtype=c.dtype,
                seed=c.seed,
                engine=c.engine,
                num_threads=c.num_threads,
                tp=tp,
                metrics_port=metrics_port if rank == 0 else -1,
                drain_timeout_s=c.drain_timeout_s,
                role=role,
            )
            # No preexec_fn: a plain (v)fork+exec is safe beside gRPC's threads, and the
            # child arms its own parent-death signal from --launcher-pid.
            argv = [*shard_argv(shard, c.log_level, c.log_format), "--launcher-pid", launcher]
            procs.append(subprocess.Popen(argv, env=self._child_env))
        return procs

    async def start(self):  # -> GatewayServer
        from serve.gateway.app import start_gateway

        c = self.config
        for index in range(c.num_replicas):
            port = free_port(c.bind_host)
            metrics_port = free_port(c.bind_host) if c.metrics_port >= 0 else -1
            self.replica_metrics_ports.append(metrics_port)
            target = _address(self.internal_host, port)
            role = c.roles[index] if index < len(c.roles) else "both"
            spawn = functools.partial(self._spawn_group, port, metrics_port, role)
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
                max_concurrent_streams=c.max_concurrent_streams,
                max_queued_prompt_tokens=c.max_queued_prompt_tokens,
                api_keys=c.api_keys,
                tls=c.tls,
                cluster_secret=self.cluster_secret,
                kv_codec=c.kv_codec,
                prefix_affinity=c.prefix_affinity,
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
            f"replica {i} http://{_address(dep.internal_host, port)}/metrics"
            for i, port in enumerate(dep.replica_metrics_ports)
            if port >= 0
        ]
        print("metrics: " + ", ".join(urls), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if demo and config.tls.enabled:
            print("(no demo: the gateway serves TLS, which the demo client is not set up for)")
        elif demo:
            api_key = config.api_keys[0] if config.api_keys else None
            await show_demo(target, random_weights=is_preset(config.model), api_key=api_key)
            print(
                f'\nstill serving on {target}; try: shardwire chat --target {target} "hi"',
                flush=True,
            )
        await stop.wait()
    finally:
        print("shutting down", flush=True)
        await dep.stop()
    return 0


async def show_demo(target: str, random_weights: bool, api_key: str | None = None) -> None:
    """Streams one chat answer and one translation through the public API."""
    from clients.client import AsyncClient

    async with AsyncClient(target, api_key=api_key) as client:
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
