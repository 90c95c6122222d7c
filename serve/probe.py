"""`shardwire probe`: a grpc.health.v1 check for container health checks and scripts.

Exits 0 when the target reports SERVING for the service, 1 otherwise (NOT_SERVING,
unknown service, unreachable, timed out), with one line on stderr saying which.
Needs only grpcio and grpcio-health-checking, so it starts fast inside a container.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def check(target: str, service: str = "", timeout_s: float = 2.0) -> tuple[bool, str]:
    """(whether `target` reports `service` SERVING, the status or error in words)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
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


def run(a: argparse.Namespace) -> int:
    serving, what = check(a.target, a.service, a.timeout)
    name = a.service or "(server)"
    if not serving or not a.quiet:
        print(f"{a.target} {name}: {what}", file=sys.stderr if not serving else sys.stdout)
    return 0 if serving else 1
