"""`shardwire.v1.Admin` on the gateway: operator calls over the replicas behind it.

Drain moves every request in flight on a replica to the others (live migration)
and takes it out of rotation; Migrate moves one request. The servicer converts
protobuf to one Migrator call and back."""

from __future__ import annotations

import logging
import re

import grpc
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from serve.errors import InvalidArgument, NotFound
from serve.gateway.migration import Migrator

logger = logging.getLogger(__name__)

ADMIN_SERVICE = "shardwire.v1.Admin"
# KV codec names (serve.comm.kv_codecs; the gateway does not import torch).
KV_CODEC_NAME = re.compile(r"none|lossless|(int8|fp8|int4)(\+zstd\d{0,2})?")


def check_kv_codec(name: str) -> str:
    """A KV codec name, checked ('' keeps the gateway's default)."""
    name = name.strip().lower()
    if name and not KV_CODEC_NAME.fullmatch(name):
        raise InvalidArgument(
            f"unknown KV codec {name!r}; expected none, lossless, int8, fp8 or int4 (+zstd)"
        )
    return name


class AdminServicer(shard_pb2_grpc.AdminServicer):
    def __init__(self, migrator: Migrator) -> None:
        self._migrator = migrator

    async def Drain(  # noqa: N802 - gRPC method name
        self, request: shard_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.DrainResponse:
        if not request.replica:
            raise InvalidArgument("replica must name a replica (host:port)")
        router = self._migrator.router
        replica = router.replica(request.replica)
        if replica is None:
            known = ", ".join(r.address for r in router.replicas)
            raise NotFound(f"no replica {request.replica!r} behind this gateway ({known})")
        if request.uncordon:
            replica.is_cordoned = False
            logger.info("replica %s is back in rotation", replica.address)
            return shard_pb2.DrainResponse()
        codec = check_kv_codec(request.kv_codec)
        moved, failed = await self._migrator.drain(replica.address, codec)
        return shard_pb2.DrainResponse(num_migrated=moved, num_failed=failed)

    async def Migrate(  # noqa: N802
        self, request: shard_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> shard_pb2.MigrateResponse:
        if not request.request_id:
            raise InvalidArgument("request_id must not be empty")
        result = await self._migrator.migrate(
            request.request_id,
            target_address=request.target,
            at_output_token=request.at_output_token,
            kv_codec=check_kv_codec(request.kv_codec),
        )
        return shard_pb2.MigrateResponse(
            source=result.source,
            target=result.target if result.moved else "",
            num_output_tokens=result.num_output_tokens,
            wire_bytes=result.wire_bytes,
        )
