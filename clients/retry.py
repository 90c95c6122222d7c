"""The gateway's overload hint: a call refused for load (RESOURCE_EXHAUSTED with a
`retry-after-ms` trailing metadata entry) is worth sending again after that long."""

from __future__ import annotations

import grpc

RETRY_AFTER_KEY = "retry-after-ms"


def retry_after_ms(error: grpc.RpcError) -> int | None:
    """Milliseconds the gateway suggests waiting before retrying the call that
    failed with `error`; None when the refusal is not about load (a request that is
    too large, say) or the error is another one."""
    code = error.code() if hasattr(error, "code") else None
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(int(value), 0)
            except (TypeError, ValueError):
                return None
    return None
