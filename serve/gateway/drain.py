"""Graceful drain: count the calls in flight and, once draining, refuse new ones
with UNAVAILABLE while the running ones finish.

The gate is a server interceptor over the guarded methods only, so health,
reflection (and on a replica leader Status and Abort) keep answering during a
drain; health says NOT_SERVING then. The gateway guards the Inference service,
a replica leader `Shard.Generate`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

logger = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]

_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
REFUSED = "the server is shutting down; retry elsewhere"


class DrainGate(grpc.aio.ServerInterceptor):
    """Tracks calls in flight whose method path starts with one of `prefixes`
    (e.g. "/shardwire.v1.Inference/"); `drain` closes the gate and waits."""

    def __init__(self, prefixes: Collection[str]) -> None:
        self._prefixes = tuple(prefixes)
        self.num_active = 0
        self.is_draining = False
        self._changed = asyncio.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        for kind, factory in _FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(
                    self._wrap(behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new calls from now on and waits up to timeout_s for those in
        flight; returns whether all finished."""
        self.is_draining = True
        deadline = time.monotonic() + timeout_s
        logger.info("draining: %d call(s) in flight, at most %.0f s", self.num_active, timeout_s)
        while self.num_active > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logger.warning("drain timed out with %d call(s) in flight", self.num_active)
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        logger.info("drained: no call in flight")
        return True

    def _enter(self) -> None:
        self.num_active += 1

    def _exit(self) -> None:
        self.num_active -= 1
        self._changed.set()

    def _wrap(self, behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if self.is_draining:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
                self._enter()
                responses = behavior(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()
                    self._exit()

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.is_draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
            self._enter()
            try:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                self._exit()

        return call
