"""Domain errors. Each carries the gRPC status name it maps to; only the
gRPC layers (gateway, shard servicer) translate them into status codes."""

from __future__ import annotations


class ShardwireError(Exception):
    """Base class. `code` is a grpc.StatusCode name."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ShardwireError):
    code = "INVALID_ARGUMENT"


class NotFound(ShardwireError):
    code = "NOT_FOUND"


class ResourceExhausted(ShardwireError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ShardwireError):
    code = "UNAVAILABLE"


class FailedPrecondition(ShardwireError):
    code = "FAILED_PRECONDITION"


class DeadlineExceeded(ShardwireError):
    code = "DEADLINE_EXCEEDED"


class Aborted(ShardwireError):
    """The request was aborted while this call worked on it."""

    code = "ABORTED"


class EngineDead(ShardwireError):
    """The engine loop stopped; no request can be served by this replica."""

    code = "UNAVAILABLE"
