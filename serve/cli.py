"""The `shardwire` console script: server commands (up, gateway, shard, bench)
and the client commands (chat, translate, generate, models).

Server commands import torch lazily, so the client commands run on the base
install."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from serve.config import (
    CLUSTER_SECRET_ENV,
    TP_TRANSPORTS,
    EngineConfig,
    GatewayConfig,
    LiveTranslateConfig,
    PrefixAffinityConfig,
    SessionConfig,
    ShardConfig,
    TLSClientConfig,
    TLSServerConfig,
    TPConfig,
    env_float,
    env_int,
    env_list,
    env_str,
)

logger = logging.getLogger(__name__)

# Replica roles (serve.shard.servicer.ROLES; kept here so the CLI needs no grpc import).
ROLES = ("both", "prefill", "decode")

# `shardwire bench NAME` runs serve.bench.<module>.main(argv).
BENCHMARKS = {
    "serve": "serve",
    "codecs": "codecs",
    "comm": "comm",
    "tp": "tp",
    "realtime": "realtime",
    "kv": "kv",
    "affinity": "affinity",
    "soak": "soak",
}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument(
        "--model",
        default=env_str("SHARDWIRE_MODEL", "tiny"),
        help="preset name (tiny, small) or a Hugging Face folder",
    )
    p.add_argument(
        "--dtype",
        default=env_str("SHARDWIRE_DTYPE", "float32"),
        choices=("float32", "bfloat16", "float16"),
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the presets' random weights")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument(
        "--max-model-len", type=int, default=d.max_model_len, help="0: the model's context length"
    )
    p.add_argument("--kv-cache-mb", type=int, default=d.kv_cache_bytes // (1024 * 1024))
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--num-threads", type=int, default=0, help="torch threads (0: default)")


def _add_comm_args(p: argparse.ArgumentParser) -> None:
    d = TPConfig()
    p.add_argument(
        "--comm-codec",
        default=env_str("SHARDWIRE_COMM_CODEC", d.comm_codec),
        help="activation codec between TP ranks: none|lossless|int8|fp8|int4[+zstd]|auto",
    )
    p.add_argument(
        "--comm-accuracy",
        default=d.comm_accuracy,
        choices=("exact", "lossless", "lossy"),
        help="what --comm-codec auto may choose from",
    )
    p.add_argument("--comm-zstd-level", type=int, default=d.comm_zstd_level)
    p.add_argument(
        "--tp-overlap-chunks",
        type=int,
        default=env_int("SHARDWIRE_TP_OVERLAP_CHUNKS", d.overlap_chunks),
        help=f"cut steps of >= {d.overlap_min_tokens} tokens into this many micro-chunks whose"
        " all-reduces overlap the next chunk's compute, when those are bound by the link"
        " (1: off; gloo only)",
    )
    p.add_argument(
        "--tp-transport",
        default=env_str("SHARDWIRE_TP_TRANSPORT", d.transport),
        choices=TP_TRANSPORTS,
        help="small exchanges between TP ranks: shm (shared memory, one host), socket (direct"
        " TCP), gloo, or auto (shm when --master-addr is a loopback address, else socket)",
    )
    p.add_argument(
        "--tp-timeout",
        type=float,
        default=env_float("SHARDWIRE_TP_TIMEOUT", d.timeout_s),
        help="seconds any collective may wait (a dead rank is noticed within it)",
    )


def _add_drain_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=env_float("SHARDWIRE_DRAIN_TIMEOUT", GatewayConfig().drain_timeout_s),
        help=f"on SIGTERM, seconds {what} may take to finish before exiting",
    )


def _add_session_args(p: argparse.ArgumentParser) -> None:
    """Limits of chat sessions (append_only) and TranslateLive streams."""
    s, live = SessionConfig(), LiveTranslateConfig()
    p.add_argument(
        "--max-sessions",
        type=int,
        default=s.max_sessions,
        help="chat sessions kept at once; a new one evicts the least recently used",
    )
    p.add_argument(
        "--session-max-turns", type=int, default=s.max_turns, help="messages one session may hold"
    )
    p.add_argument(
        "--session-max-bytes",
        type=int,
        default=s.max_bytes,
        help="bytes of text one session may hold",
    )
    p.add_argument(
        "--session-max-turn-bytes",
        type=int,
        default=s.max_turn_bytes,
        help="bytes of text one append_only call may add",
    )
    p.add_argument(
        "--session-idle-timeout",
        type=float,
        default=s.idle_timeout_s,
        help="seconds an unused session is kept",
    )
    p.add_argument(
        "--live-max-pending",
        type=int,
        default=live.max_pending_segments,
        help="TranslateLive segments waiting for their translation",
    )
    p.add_argument(
        "--live-max-segment-bytes",
        type=int,
        default=live.max_segment_bytes,
        help="bytes of one TranslateLive segment",
    )
    p.add_argument(
        "--live-context-segments",
        type=int,
        default=live.default_context_segments,
        help="previous segments kept as context when the client does not say",
    )
    p.add_argument(
        "--live-max-context-segments",
        type=int,
        default=live.max_context_segments,
        help="the most context segments a client may ask for",
    )
    p.add_argument(
        "--live-config-timeout",
        type=float,
        default=live.config_timeout_s,
        help="seconds a TranslateLive stream may take to send its config",
    )
    p.add_argument(
        "--live-idle-timeout",
        type=float,
        default=live.idle_timeout_s,
        help="seconds a TranslateLive stream may stay silent between messages",
    )


def _session_configs(a: argparse.Namespace) -> tuple[SessionConfig, LiveTranslateConfig]:
    sessions = SessionConfig(
        max_sessions=a.max_sessions,
        max_turns=a.session_max_turns,
        max_bytes=a.session_max_bytes,
        max_turn_bytes=a.session_max_turn_bytes,
        idle_timeout_s=a.session_idle_timeout,
    )
    live = LiveTranslateConfig(
        max_pending_segments=a.live_max_pending,
        max_segment_bytes=a.live_max_segment_bytes,
        default_context_segments=a.live_context_segments,
        max_context_segments=a.live_max_context_segments,
        config_timeout_s=a.live_config_timeout,
        idle_timeout_s=a.live_idle_timeout,
    )
    return sessions, live


def _add_overload_args(p: argparse.ArgumentParser) -> None:
    """Gateway caps past which new calls get RESOURCE_EXHAUSTED with a retry-after hint."""
    d = GatewayConfig()
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=env_int("SHARDWIRE_MAX_CONCURRENT_STREAMS", d.max_concurrent_streams),
        help="inference streams the gateway serves at once (0: no cap)",
    )
    p.add_argument(
        "--max-queued-prompt-tokens",
        type=int,
        default=env_int("SHARDWIRE_MAX_QUEUED_PROMPT_TOKENS", d.max_queued_prompt_tokens),
        help="prompt tokens admitted and still waiting for their first token (0: no cap)",
    )


def _add_prefix_affinity_args(p: argparse.ArgumentParser) -> None:
    """Routing of requests without a session_id by their prompt's cached prefix."""
    d = PrefixAffinityConfig()
    p.add_argument(
        "--no-prefix-affinity",
        action="store_true",
        help="route requests without a session_id by load only, not to the replica that "
        "probably holds their prompt's prefix",
    )
    p.add_argument(
        "--prefix-affinity-slack",
        type=float,
        default=env_float("SHARDWIRE_PREFIX_AFFINITY_SLACK", d.load_slack),
        help="a replica holding the prompt's prefix gets the request while its outstanding "
        "tokens are within (1 + this) of the replicas' mean",
    )


def _prefix_affinity(a: argparse.Namespace) -> PrefixAffinityConfig:
    try:
        return PrefixAffinityConfig(
            enabled=not a.no_prefix_affinity, load_slack=a.prefix_affinity_slack
        )
    except ValueError as err:
        a.parser.error(f"--prefix-affinity-slack: {err}")


def _add_api_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept clients sending `authorization: Bearer KEY` (repeatable; visible in ps: "
        "prefer --api-key-file); with no key every client is accepted",
    )
    p.add_argument(
        "--api-key-file",
        default=env_str("SHARDWIRE_API_KEY_FILE", ""),
        metavar="PATH",
        help="file of accepted API keys, one per line (# comments)",
    )


def _add_cluster_secret_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-secret",
        default="",
        metavar="SECRET",
        help="secret shared by the gateway and its replica leaders, sent with every internal "
        f"call (visible in ps: prefer --cluster-secret-file or ${CLUSTER_SECRET_ENV})",
    )
    p.add_argument(
        "--cluster-secret-file", default="", metavar="PATH", help="file holding the cluster secret"
    )


def _add_tls_args(p: argparse.ArgumentParser, port: str) -> None:
    p.add_argument("--tls-cert", default="", metavar="PEM", help=f"serve TLS on {port}")
    p.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default="",
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )


def _add_replica_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replica-tls-ca",
        default="",
        metavar="PEM",
        help="reach the replicas over TLS, trusting this CA for their certificates",
    )
    p.add_argument(
        "--replica-tls-cert",
        default="",
        metavar="PEM",
        help="client certificate for replicas that require mutual TLS",
    )
    p.add_argument("--replica-tls-key", default="", metavar="PEM", help="its private key")
    p.add_argument(
        "--replica-tls-server-name",
        default="",
        metavar="NAME",
        help="name the replicas' certificates carry, if not the host of their address",
    )


def _api_keys(a: argparse.Namespace) -> tuple[str, ...]:
    from serve.gateway.auth import check_token, read_key_file

    try:
        keys = [check_token(k, "--api-key") for k in a.api_key]
        if a.api_key_file:
            keys.extend(read_key_file(a.api_key_file))
    except (OSError, ValueError) as exc:
        a.parser.error(str(exc))
    return tuple(keys)


def _cluster_secret(a: argparse.Namespace) -> str:
    """--cluster-secret, --cluster-secret-file or $SHARDWIRE_CLUSTER_SECRET ('' if none)."""
    from serve.gateway.auth import check_token, read_secret_file

    if a.cluster_secret and a.cluster_secret_file:
        a.parser.error("give --cluster-secret or --cluster-secret-file, not both")
    try:
        if a.cluster_secret_file:
            return read_secret_file(a.cluster_secret_file)
        secret = a.cluster_secret or env_str(CLUSTER_SECRET_ENV, "")
        return check_token(secret, "the cluster secret") if secret else ""
    except (OSError, ValueError) as exc:
        a.parser.error(str(exc))
    return ""


def _tls_server(a: argparse.Namespace) -> TLSServerConfig:
    from serve.gateway.tls import server_credentials

    tls = TLSServerConfig(cert_file=a.tls_cert, key_file=a.tls_key, client_ca_file=a.tls_client_ca)
    try:
        server_credentials(tls)  # unreadable or missing files fail here, not after start-up
    except ValueError as exc:
        a.parser.error(str(exc))
    return tls


def _replica_tls(a: argparse.Namespace) -> TLSClientConfig:
    from serve.gateway.tls import channel_credentials

    tls = TLSClientConfig(
        ca_file=a.replica_tls_ca,
        cert_file=a.replica_tls_cert,
        key_file=a.replica_tls_key,
        server_name=a.replica_tls_server_name,
    )
    try:
        channel_credentials(tls)
    except ValueError as exc:
        a.parser.error(f"replica TLS: {exc}")
    return tls


def _add_metrics_arg(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=env_int("SHARDWIRE_METRICS_PORT", 0),
        help=f"Prometheus /metrics HTTP port, {whose} (0: a free port, -1: off)",
    )


def _tp_config(
    a: argparse.Namespace, size: int, rank: int = 0, addr: str = "", port: int = 0
) -> TPConfig:
    d = TPConfig()
    return TPConfig(
        size=size,
        rank=rank,
        master_addr=addr or d.master_addr,
        master_port=port or d.master_port,
        timeout_s=a.tp_timeout,
        comm_codec=a.comm_codec,
        comm_accuracy=a.comm_accuracy,
        comm_zstd_level=a.comm_zstd_level,
        overlap_chunks=a.tp_overlap_chunks,
        transport=a.tp_transport,
    )


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        block_size=a.block_size,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        kv_cache_bytes=a.kv_cache_mb * 1024 * 1024,
        enable_prefix_caching=not a.no_prefix_caching,
    )


def _cmd_up(a: argparse.Namespace) -> int:
    from serve.launch import LaunchConfig, run_up
    from serve.supervisor import RestartPolicy

    cfg = LaunchConfig(
        model=a.model,
        host=a.host,
        port=a.port,
        num_replicas=a.replicas,
        dtype=a.dtype,
        seed=a.seed,
        engine=_engine_config(a),
        num_threads=a.num_threads,
        log_level=a.log_level,
        log_format=a.log_format,
        tp=_tp_config(a, a.tp),
        metrics_port=a.metrics_port,
        drain_timeout_s=a.drain_timeout,
        restart=RestartPolicy(enabled=not a.no_restart),
        sessions=_session_configs(a)[0],
        live=_session_configs(a)[1],
        max_concurrent_streams=a.max_concurrent_streams,
        max_queued_prompt_tokens=a.max_queued_prompt_tokens,
        bind_host=a.bind_host,
        api_keys=_api_keys(a),
        tls=_tls_server(a),
        cluster_secret=_cluster_secret(a),
        tp_socket_ifname=env_str("GLOO_SOCKET_IFNAME", ""),
        roles=_roles(a),
        kv_codec=a.kv_codec,
        prefix_affinity=_prefix_affinity(a),
    )
    return asyncio.run(run_up(cfg, demo=a.demo))


def _roles(a: argparse.Namespace) -> tuple[str, ...]:
    """--roles prefill,decode: one role per replica, the rest both."""
    roles = tuple(r.strip() for r in a.roles.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or len(roles) > a.replicas:
        a.parser.error(f"--roles takes up to --replicas of {', '.join(ROLES)}; got {a.roles!r}")
    return roles


def _add_kv_codec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-codec",
        default=env_str("SHARDWIRE_KV_CODEC", GatewayConfig().kv_codec),
        help="KV codec of live migration, prefill hand-overs and prefix fetches: none, "
        "lossless, int8[+zstd], int4[+zstd] (lossy codecs trade exactness for bytes)",
    )


def _exit_with_launcher(launcher_pid: int) -> None:
    """A rank started by `shardwire up` gets SIGTERM when the launcher dies (Linux)."""
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher_pid:  # it died before the signal was armed
        sys.exit(f"launcher {launcher_pid} is gone")


def _cmd_shard(a: argparse.Namespace) -> int:
    if a.launcher_pid:
        _exit_with_launcher(a.launcher_pid)
    from serve.shard.app import run_shard

    tp = _tp_config(a, a.tp_size, a.tp_rank, a.master_addr, a.master_port)
    cfg = ShardConfig(
        model=a.model,
        host=a.host,
        port=a.port,
        dtype=a.dtype,
        seed=a.seed,
        engine=_engine_config(a),
        num_threads=a.num_threads,
        tp=tp,
        metrics_port=a.metrics_port,
        drain_timeout_s=a.drain_timeout,
        cluster_secret=_cluster_secret(a),
        tls=_tls_server(a),
        role=a.role,
        prefix_fetch=a.prefix_fetch,
    )
    if tp.rank > 0:
        import os
        import signal

        from serve.dist.worker import serve_worker

        # SIGTERM stops a rank like Ctrl-C: it cannot drain alone (its leader does),
        # and a rank already leaving after the leader's stop still exits 0.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            code = serve_worker(cfg)
        except KeyboardInterrupt:  # Ctrl-C reaches every rank; the leader reports it
            code = 0
        except Exception as exc:  # noqa: BLE001 - the group is broken: exit so it restarts
            logger.error("rank %d/%d leaves its group: %s", tp.rank, tp.size, exc)
            code = 1
        # No interpreter teardown: the group is gone, and torch's teardown takes long
        # enough for a stop signal to land after Python has reset its handlers.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return asyncio.run(run_shard(cfg))


def _cmd_gateway(a: argparse.Namespace) -> int:
    from serve.gateway.app import run_gateway

    # --replica is repeatable and each may list several; SHARDWIRE_REPLICAS is the fallback.
    replicas = [r.strip() for value in a.replica for r in value.split(",") if r.strip()]
    replicas = replicas or env_list("SHARDWIRE_REPLICAS")
    if not replicas:
        a.parser.error("no replica: pass --replica HOST:PORT or set SHARDWIRE_REPLICAS")
    cfg = GatewayConfig(
        model=a.model,
        host=a.host,
        port=a.port,
        replicas=tuple(replicas),
        max_tokens_limit=a.max_tokens_limit,
        log_prompts=a.log_prompts,
        metrics_port=a.metrics_port,
        drain_timeout_s=a.drain_timeout,
        sessions=_session_configs(a)[0],
        live=_session_configs(a)[1],
        max_concurrent_streams=a.max_concurrent_streams,
        max_queued_prompt_tokens=a.max_queued_prompt_tokens,
        api_keys=_api_keys(a),
        tls=_tls_server(a),
        cluster_secret=_cluster_secret(a),
        replica_tls=_replica_tls(a),
        kv_codec=a.kv_codec,
        prefix_affinity=_prefix_affinity(a),
        replica_keepalive_s=a.replica_keepalive,
        replica_keepalive_timeout_s=a.replica_keepalive_timeout,
    )
    asyncio.run(run_gateway(cfg))
    return 0


def _cmd_probe(a: argparse.Namespace) -> int:
    from serve.probe import run

    return run(a)


def _cmd_bench(a: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"serve.bench.{BENCHMARKS[a.which]}")
    return int(module.main(a.bench_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwire", description=__doc__)
    parser.add_argument("--log-level", default=env_str("SHARDWIRE_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-format", default=env_str("SHARDWIRE_LOG_FORMAT", "text"), choices=("text", "json")
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start replicas and the gateway on loopback")
    _add_engine_args(up)
    up.add_argument("--host", default="127.0.0.1", help="interface the gateway binds to")
    up.add_argument("--port", type=int, default=50051)
    up.add_argument(
        "--bind-host",
        default="127.0.0.1",
        help="interface the replicas' internal ports (Shard API, TP rendezvous and gloo, "
        "/metrics) bind to",
    )
    up.add_argument("--replicas", type=int, default=1)
    up.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    up.add_argument(
        "--roles",
        default="",
        help="role of each replica, comma separated (prefill, decode, both; default both): "
        "prefill replicas hand requests to decode replicas after the first token",
    )
    _add_kv_codec_arg(up)
    _add_comm_args(up)
    _add_drain_arg(up, "streams in flight")
    up.add_argument(
        "--no-restart",
        action="store_true",
        help="leave a failed replica down (default: restart its whole TP group, with backoff)",
    )
    up.add_argument("--demo", action="store_true", help="stream a demo chat and translation")
    _add_metrics_arg(up, "the gateway's; each replica leader gets a free port (-1: all off)")
    _add_session_args(up)
    _add_overload_args(up)
    _add_prefix_affinity_args(up)
    _add_api_key_args(up)
    _add_tls_args(up, "the gateway's port")
    _add_cluster_secret_args(up)
    up.set_defaults(func=_cmd_up, parser=up)

    shard = sub.add_parser("shard", help="run one replica leader (Shard service)")
    _add_engine_args(shard)
    shard.add_argument(
        "--host",
        "--bind-host",
        dest="host",
        default="127.0.0.1",
        help="interface the Shard API and /metrics bind to",
    )
    shard.add_argument("--port", type=int, default=50061, help="Shard API port (rank 0)")
    # torchrun-style variables give the defaults, so one command line serves every rank.
    shard.add_argument("--tp-size", type=int, default=env_int("WORLD_SIZE", 1))
    shard.add_argument("--tp-rank", type=int, default=env_int("RANK", 0))
    shard.add_argument("--master-addr", default=env_str("MASTER_ADDR", "127.0.0.1"))
    shard.add_argument("--master-port", type=int, default=env_int("MASTER_PORT", 29500))
    _add_comm_args(shard)
    _add_drain_arg(shard, "the leader's requests in flight")
    shard.add_argument("--launcher-pid", type=int, default=0, help=argparse.SUPPRESS)
    shard.add_argument(
        "--role",
        default=env_str("SHARDWIRE_ROLE", "both"),
        choices=ROLES,
        help="what gateways send here: both, prefill (new prompts, handed over to a decode "
        "replica after the first token) or decode (hand-overs)",
    )
    shard.add_argument(
        "--prefix-fetch",
        default="auto",
        choices=("auto", "always", "never"),
        help="fetch a dialogue's cached prefix from the replica that served its last turn: "
        "auto (when the link model predicts it faster than recomputing), always or never",
    )
    _add_metrics_arg(shard, "the leader's (rank 0)")
    _add_cluster_secret_args(shard)
    _add_tls_args(shard, "the Shard API")
    shard.set_defaults(func=_cmd_shard, parser=shard)

    gw = sub.add_parser("gateway", help="run the public gateway (Inference service)")
    gw.add_argument(
        "--model",
        default=env_str("SHARDWIRE_MODEL", "tiny"),
        help="model whose tokenizer and template the gateway uses",
    )
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=50051)
    gw.add_argument(
        "--replica",
        action="append",
        default=[],
        help="host:port of a replica leader (repeatable, or comma separated; "
        "default: $SHARDWIRE_REPLICAS)",
    )
    gw.add_argument("--max-tokens-limit", type=int, default=GatewayConfig().max_tokens_limit)
    gw.add_argument("--log-prompts", action="store_true", help="include prompt text in logs")
    _add_kv_codec_arg(gw)
    _add_drain_arg(gw, "streams in flight")
    _add_metrics_arg(gw, "the gateway's")
    _add_session_args(gw)
    _add_overload_args(gw)
    _add_prefix_affinity_args(gw)
    _add_api_key_args(gw)
    _add_tls_args(gw, "the gateway's port")
    _add_cluster_secret_args(gw)
    _add_replica_tls_args(gw)
    gw.add_argument(
        "--replica-keepalive",
        type=float,
        default=GatewayConfig().replica_keepalive_s,
        help="seconds a replica connection with calls in flight may stay silent "
        "before it is pinged",
    )
    gw.add_argument(
        "--replica-keepalive-timeout",
        type=float,
        default=GatewayConfig().replica_keepalive_timeout_s,
        help="seconds an unanswered ping waits before the connection (and its calls) fail",
    )
    gw.set_defaults(func=_cmd_gateway, parser=gw)

    probe = sub.add_parser(
        "probe", help="health check: exit 0 iff the target reports SERVING (for containers)"
    )
    from serve.probe import add_arguments

    add_arguments(probe)
    probe.set_defaults(func=_cmd_probe)

    bench = sub.add_parser("bench", help="benchmarks (see `shardwire bench serve --help`)")
    bench.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)

    from clients.cli import register

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("up", "shard", "gateway", "bench"):
        from serve.log import setup_logging

        setup_logging(args.log_level, args.log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
