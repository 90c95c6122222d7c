"""serve.gateway.interceptor on a real grpc.aio server: domain errors keep their
code and message, anything else becomes INTERNAL, for every handler shape."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from serve.errors import InvalidArgument, NotFound
from serve.gateway.interceptor import ErrorInterceptor, current_request_id

SERVICE = "test.Echo"


def _raise(kind: str) -> None:
    if kind == "invalid":
        raise InvalidArgument("sampling.top_p must be in (0, 1], got 2")
    if kind == "missing":
        raise NotFound("model 'x' is not served here")
    if kind == "bug":
        raise RuntimeError("boom")


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    current_request_id.set("rid-unary")
    _raise(request.decode())
    return b"ok:" + request


async def stream_gen(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    _raise(request.decode())
    yield b"second"


async def stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"first")
    _raise(request.decode())
    await context.write(b"second")


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "StreamGen": grpc.unary_stream_rpc_method_handler(stream_gen),
            "StreamWrite": grpc.unary_stream_rpc_method_handler(stream_write),
        },
    )


async def _exercise() -> dict[tuple[str, str], tuple[grpc.StatusCode, str, list[bytes]]]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for kind in ("ok", "invalid", "missing", "bug"):
                request = kind.encode()
                call = channel.unary_unary(f"/{SERVICE}/Unary")(request, timeout=5)
                try:
                    got = [await call]
                except grpc.aio.AioRpcError as err:
                    got = []
                    results[("Unary", kind)] = (err.code(), err.details(), got)
                else:
                    results[("Unary", kind)] = (grpc.StatusCode.OK, "", got)
                for method in ("StreamGen", "StreamWrite"):
                    stream = channel.unary_stream(f"/{SERVICE}/{method}")(request, timeout=5)
                    got = []
                    try:
                        async for item in stream:
                            got.append(item)
                        results[(method, kind)] = (grpc.StatusCode.OK, "", got)
                    except grpc.aio.AioRpcError as err:
                        results[(method, kind)] = (err.code(), err.details(), got)
    finally:
        await server.stop(None)
    return results


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], tuple[grpc.StatusCode, str, list[bytes]]]:
    return asyncio.run(_exercise())


@pytest.mark.parametrize("method", ["Unary", "StreamGen", "StreamWrite"])
def test_domain_errors_keep_code_and_message(method: str, results: dict) -> None:
    code, details, _ = results[(method, "invalid")]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "sampling.top_p must be in (0, 1], got 2"
    code, details, _ = results[(method, "missing")]
    assert code == grpc.StatusCode.NOT_FOUND and "'x'" in details


@pytest.mark.parametrize("method", ["Unary", "StreamGen", "StreamWrite"])
def test_unexpected_errors_become_internal(method: str, results: dict) -> None:
    code, details, _ = results[(method, "bug")]
    assert code == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in details and "boom" not in details


def test_streams_deliver_items_before_the_error(results: dict) -> None:
    assert results[("StreamGen", "invalid")][2] == [b"first"]
    assert results[("StreamWrite", "bug")][2] == [b"first"]
    assert results[("StreamGen", "ok")] == (grpc.StatusCode.OK, "", [b"first", b"second"])
    assert results[("Unary", "ok")] == (grpc.StatusCode.OK, "", [b"ok:ok"])


def test_traceback_of_unexpected_errors_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="serve.gateway.interceptor"):
        asyncio.run(_exercise())
    records = [r for r in caplog.records if r.exc_info]
    assert records and all("failed unexpectedly" in r.getMessage() for r in records)
    assert any("[rid-unary]" in r.getMessage() for r in records)
