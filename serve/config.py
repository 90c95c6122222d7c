"""Frozen configuration dataclasses. Only this module and cli.py read the
environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and KV-cache settings of one replica."""

    block_size: int = 16
    # KV blocks in the pool; 0 sizes the pool from kv_cache_bytes.
    num_kv_blocks: int = 0
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 64
    # Token budget of one engine step (decode tokens + prefill chunks).
    max_num_batched_tokens: int = 512
    # 0: the model's context length.
    max_model_len: int = 0
    enable_prefix_caching: bool = True


TP_TRANSPORTS = ("auto", "shm", "socket", "gloo")


@dataclass(frozen=True)
class TPConfig:
    """This process's place in its replica's tensor-parallel group."""

    size: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # Every collective waits at most this long: a dead or hung rank is noticed.
    timeout_s: float = 30.0
    # Activation codec: none|lossless|int8|fp8|int4 (+zstd) or auto.
    comm_codec: str = "none"
    comm_accuracy: str = "exact"
    comm_zstd_level: int = 1
    # Steps of at least overlap_min_tokens tokens run as overlap_chunks micro-chunks
    # whose all-reduces overlap the next chunk's compute, where those are bound by
    # the link (1: off; gloo only).
    overlap_chunks: int = 2
    overlap_min_tokens: int = 256
    # How small exchanges between ranks travel: shm (shared memory, every rank on
    # this host), socket (direct TCP between ranks), gloo (gloo's own messages),
    # or auto (shm when the group meets on a loopback address, else socket).
    transport: str = "auto"

    def __post_init__(self) -> None:
        if self.transport not in TP_TRANSPORTS:
            raise ValueError(f"TP transport must be one of {TP_TRANSPORTS}, got {self.transport!r}")

    @property
    def resolved_transport(self) -> str:
        """shm, socket or gloo."""
        if self.transport == "auto":
            return "shm" if self.master_addr in ("127.0.0.1", "localhost", "::1") else "socket"
        return self.transport


# The cluster secret's environment variable: `shardwire up` hands its secret to the
# replica processes it starts through it, so the secret stays off command lines.
CLUSTER_SECRET_ENV = "SHARDWIRE_CLUSTER_SECRET"


@dataclass(frozen=True)
class TLSServerConfig:
    """TLS of a gRPC server (PEM files); no certificate: plaintext."""

    cert_file: str = ""
    key_file: str = ""
    # With a client CA, a client must present a certificate it signed (mutual TLS).
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class TLSClientConfig:
    """TLS of a gRPC client (PEM files); on once a CA or a certificate is set."""

    # CA the server's certificate must chain to; empty: the system's roots.
    ca_file: str = ""
    # Client certificate and key, for servers that require mutual TLS.
    cert_file: str = ""
    key_file: str = ""
    # Name the server's certificate must carry, where it differs from the address's host.
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file)


@dataclass(frozen=True)
class ShardConfig:
    """One rank of a replica; rank 0 (the leader) serves the Shard API."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 50061
    dtype: str = "float32"
    seed: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_threads: int = 0
    tp: TPConfig = field(default_factory=TPConfig)
    # Prometheus /metrics of the leader (rank 0); 0 picks a free port, -1 is off.
    metrics_port: int = -1
    # On SIGTERM the leader reports NOT_SERVING, refuses new requests and lets those
    # running finish for at most this long.
    drain_timeout_s: float = 30.0
    # The leader refuses calls (health aside) that lack this secret; empty: no check.
    # `host` is the interface the Shard API and /metrics bind to (loopback by default).
    cluster_secret: str = field(default="", repr=False)
    tls: TLSServerConfig = field(default_factory=TLSServerConfig)
    # What gateways send here: both (everything), prefill (new prompts, handed over
    # to a decode replica after the first token) or decode (hand-overs).
    role: str = "both"
    # Fetch a dialogue prefix another replica holds: auto (when the link model
    # predicts it faster than recomputing), always or never.
    prefix_fetch: str = "auto"


@dataclass(frozen=True)
class SessionConfig:
    """Chat sessions the gateway keeps for `append_only` calls."""

    # Sessions held at once; a new one evicts the least recently used idle session.
    max_sessions: int = 1024
    # Messages one session may hold (user, assistant and system turns).
    max_turns: int = 256
    # UTF-8 bytes of message text one session may hold.
    max_bytes: int = 256 * 1024
    # UTF-8 bytes of the messages one append_only call may add.
    max_turn_bytes: int = 32 * 1024
    # A session unused this long is dropped.
    idle_timeout_s: float = 600.0


@dataclass(frozen=True)
class LiveTranslateConfig:
    """Limits of `TranslateLive` streams."""

    # Segments received and not yet translated (the one in progress included).
    max_pending_segments: int = 8
    # UTF-8 bytes of one segment.
    max_segment_bytes: int = 4096
    # Previous segments kept as context when the client does not say.
    default_context_segments: int = 8
    # The most a client may ask for.
    max_context_segments: int = 64
    # Seconds a stream may take to send its config, and may then stay silent
    # between messages: an idle stream must not hold a stream slot for good.
    config_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0


@dataclass(frozen=True)
class PrefixAffinityConfig:
    """Routing by prompt prefix for requests without a session_id."""

    enabled: bool = True
    # Tokens per hashed block: prefixes are matched in whole blocks.
    block_tokens: int = 16
    # Block hashes remembered over all replicas; the least recently used go first.
    max_blocks: int = 1 << 18
    # Bounded load: the replica holding the prefix is chosen only while its
    # outstanding tokens, this request's included, stay within (1 + load_slack)
    # of the healthy replicas' mean; otherwise the least loaded one is.
    load_slack: float = 0.25

    def __post_init__(self) -> None:
        if self.block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        if self.max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        if self.load_slack < 0:
            raise ValueError("load_slack must be at least 0")


@dataclass(frozen=True)
class GatewayConfig:
    """The public gRPC frontend."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    port: int = 50051
    replicas: tuple[str, ...] = ("127.0.0.1:50061",)
    # max_tokens when the request leaves it unset, and the largest allowed.
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    # Largest request message the server accepts, in bytes.
    max_request_bytes: int = 1 << 20
    max_stop_strings: int = 16
    max_stop_string_len: int = 256
    # Name the model is served under; empty: derived from `model`.
    served_model_name: str = ""
    log_prompts: bool = False
    # Seconds start-up waits for a replica to answer Status before giving up.
    startup_timeout_s: float = 60.0
    # Seconds between Status polls of each replica (health and load).
    status_poll_interval_s: float = 1.0
    # A replica connection with calls in flight that is silent this long is pinged,
    # and closed (its calls fail over or end UNAVAILABLE) when no answer comes
    # within the timeout: a replica that froze does not hold its streams for good.
    replica_keepalive_s: float = 10.0
    replica_keepalive_timeout_s: float = 20.0
    # Prometheus /metrics over HTTP on host:metrics_port; 0 picks a free port, -1 is off.
    metrics_port: int = -1
    # On SIGTERM: health NOT_SERVING, new calls refused with UNAVAILABLE, calls in flight
    # finish for at most this long before the process exits.
    drain_timeout_s: float = 30.0
    sessions: SessionConfig = field(default_factory=SessionConfig)
    live: LiveTranslateConfig = field(default_factory=LiveTranslateConfig)
    # Keys clients send as `authorization: Bearer KEY`; empty: no check. Health and
    # reflection answer without one.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    tls: TLSServerConfig = field(default_factory=TLSServerConfig)
    # Sent to the replicas with every call (they refuse calls without it when they
    # hold one), and the TLS of the links to them.
    cluster_secret: str = field(default="", repr=False)
    replica_tls: TLSClientConfig = field(default_factory=TLSClientConfig)
    # KV codec of the moves this gateway orchestrates (live migration, hand-overs
    # from prefill replicas, prefix fetches): none, lossless, int8[+zstd], int4[+zstd].
    kv_codec: str = "lossless"
    # Overload: inference streams in flight, and prompt tokens admitted but still
    # waiting for their first token; past either, new calls get RESOURCE_EXHAUSTED
    # at once with a retry-after-ms hint. 0: no cap.
    max_concurrent_streams: int = 256
    max_queued_prompt_tokens: int = 65536
    # Requests without a session_id follow their prompt's cached prefix (bounded load).
    prefix_affinity: PrefixAffinityConfig = field(default_factory=PrefixAffinityConfig)


def env_int(name: str, default: int) -> int:
    """An integer from the environment, or the default."""
    value = os.environ.get(name)
    return int(value) if value else default


def env_str(name: str, default: str) -> str:
    return os.environ.get(name) or default


def env_float(name: str, default: float) -> float:
    """A number from the environment, or the default."""
    value = os.environ.get(name)
    return float(value) if value else default


def env_list(name: str) -> list[str]:
    """Comma-separated items from the environment (empty items dropped)."""
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]
