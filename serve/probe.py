"""`shardwire probe`: a grpc.health.v1 check for container health checks and scripts.

Exits 0 when the target reports SERVING for the service, 1 otherwise (NOT_SERVING,
unknown service, unreachable, timed out), with one line on stderr saying which.
Needs only grpcio and grpcio-health-checking, so it starts fast inside a container.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from serve.config import TLSClientConfig

if TYPE_CHECKING:
    import grpc

logger = logging.getLogger(__name__)


def _channel(target: str, tls: TLSClientConfig, system_roots: bool) -> grpc.Channel:
    """Plaintext, or TLS with the given CA (or the system's roots) and client cert."""
    import grpc

    from serve.gateway.tls import channel_credentials

    if system_roots and not tls.enabled:
        credentials: grpc.ChannelCredentials | None = grpc.ssl_channel_credentials()
    else:
        credentials = channel_credentials(tls)  # None: plaintext
    if credentials is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(
    target: str,
    service: str = "",
    timeout_s: float = 2.0,
    tls: TLSClientConfig | None = None,
    system_roots: bool = False,
) -> tuple[bool, str]:
    """(whether `target` reports `service` SERVING, the status or error in words)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(target, tls or TLSClientConfig(), system_roots) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = stub.Check(request, timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            details = err.details() if isinstance(err, grpc.Call) else str(err)
            return False, f"{name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, status


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of a gateway or shard")
    p.add_argument(
        "--service",
        default="",
        help="health service name ('' is the whole server; e.g. shardwire.v1.Inference)",
    )
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    p.add_argument("--quiet", action="store_true", help="print nothing when SERVING")
    p.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    p.add_argument("--tls-ca", default="", metavar="PEM", help="CA that signed the target")
    p.add_argument("--tls-cert", default="", metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--tls-key", default="", metavar="PEM", help="its private key")
    p.add_argument("--tls-server-name", default="", help="name to check the certificate against")


def run(a: argparse.Namespace) -> int:
    tls = TLSClientConfig(a.tls_ca, a.tls_cert, a.tls_key, a.tls_server_name)
    try:
        serving, what = check(a.target, a.service, a.timeout, tls, system_roots=a.tls)
    except (OSError, ValueError) as err:
        serving, what = False, f"bad TLS settings: {err}"
    name = a.service or "(server)"
    if not serving or not a.quiet:
        print(f"{a.target} {name}: {what}", file=sys.stderr if not serving else sys.stdout)
    return 0 if serving else 1
