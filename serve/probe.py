"""`shardwire probe`: a grpc.health.v1 check for container health checks and scripts.

Exits 0 when the target reports SERVING for the service, 1 otherwise (NOT_SERVING,
unknown service, unreachable, timed out), with one line on stderr saying which.
Needs only grpcio and grpcio-health-checking, so it starts fast inside a container.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeTLS:
    """TLS of the probe's channel: off unless `enabled` (or a CA or certificate is
    given); CA, certificate and key are PEM file paths ('' for none)."""

    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    @property
    def is_on(self) -> bool:
        return self.enabled or bool(self.ca_file or self.cert_file)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _channel(target: str, tls: ProbeTLS) -> grpc.Channel:
    import grpc

    if not tls.is_on:
        return grpc.insecure_channel(target)
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(
    target: str, service: str = "", timeout_s: float = 2.0, tls: ProbeTLS | None = None
) -> tuple[bool, str]:
    """(whether `target` reports `service` SERVING, the status or error in words)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(target, tls or ProbeTLS()) as channel:
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
    tls = ProbeTLS(a.tls, a.tls_ca, a.tls_cert, a.tls_key, a.tls_server_name)
    try:
        serving, what = check(a.target, a.service, a.timeout, tls)
    except (OSError, ValueError) as err:
        serving, what = False, f"bad TLS settings: {err}"
    name = a.service or "(server)"
    if not serving or not a.quiet:
        print(f"{a.target} {name}: {what}", file=sys.stderr if not serving else sys.stdout)
    return 0 if serving else 1
