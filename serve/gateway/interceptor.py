"""The one server interceptor: domain errors -> gRPC status codes.

A `ShardwireError` raised by any handler (unary or streaming, coroutine or
async generator) aborts the call with the error's code and message; any other
exception aborts with INTERNAL and its traceback is logged. Request bytes that
do not parse as the method's message are refused with INVALID_ARGUMENT (gRPC
alone would answer UNKNOWN and log a traceback per call)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from serve.errors import InvalidArgument, ShardwireError

logger = logging.getLogger(__name__)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]

# Set by handlers once they know the request id, so error lines carry it.
current_request_id: ContextVar[str] = ContextVar("shardwire_request_id", default="-")
# A status message travels percent-encoded in an HTTP/2 trailer; past the client's
# metadata limit (16 KiB) the client would see only "Stream removed", so longer
# messages are cut.
MAX_STATUS_MESSAGE_CHARS = 512


class MalformedRequest:
    """Stands in for request bytes that did not parse; the call is refused."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def refuse(self) -> InvalidArgument:
        return InvalidArgument(f"the request message does not parse: {self.error}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - any parse failure refuses the call
            return MalformedRequest(error)

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises at its first malformed message."""
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise request.refuse()
        yield request


def _unmalformed(request: Any, streaming: bool) -> Any:
    if streaming:
        return _checked(request)
    if isinstance(request, MalformedRequest):
        raise request.refuse()
    return request


def status_of(error: BaseException, context: grpc.aio.ServicerContext | None = None) -> str:
    """The status code name a call ending with `error` reports to its client."""
    if isinstance(error, ShardwireError):
        code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
        return code.name
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED.name
        return grpc.StatusCode.CANCELLED.name
    if isinstance(error, grpc.aio.AbortError) and context is not None:
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
        return grpc.StatusCode.UNKNOWN.name
    return grpc.StatusCode.INTERNAL.name


async def _abort(error: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    rid = current_request_id.get()
    if isinstance(error, ShardwireError):
        code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
        message = error.message
        if len(message) > MAX_STATUS_MESSAGE_CHARS:
            message = message[: MAX_STATUS_MESSAGE_CHARS - 3] + "..."
        logger.info("[%s] %s -> %s: %s", rid, method, code.name, message)
        await context.abort(code, message)
    logger.error("[%s] %s failed unexpectedly", rid, method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


def _wrap(behavior: Behavior, method: str, streaming: bool = False) -> Behavior:
    """`streaming`: the handler takes a stream of requests."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                responses = behavior(_unmalformed(request, streaming), context)
            except Exception as error:
                await _abort(error, context, method)
            try:
                async for response in responses:
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(error, context, method)
            finally:
                await responses.aclose()

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            result = behavior(_unmalformed(request, streaming), context)
            if inspect.isawaitable(result):
                result = await result
            return result
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(error, context, method)

    return call


_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind, factory in _FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(
                    _wrap(behavior, method, streaming=kind.startswith("stream")),
                    request_deserializer=_tolerant(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
        return handler
