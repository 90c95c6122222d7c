"""Who may call: API keys on the gateway, the cluster secret on replica leaders.

Clients send `authorization: Bearer KEY`; the gateway's `AuthInterceptor` turns away
calls without a valid key with UNAUTHENTICATED. A replica leader does the same
with the cluster secret, which the gateway sends as `x-shardwire-cluster-secret` on
every call (`secret_metadata`). grpc.health.v1 and reflection answer without a
credential, so probes and `grpcurl list` keep working.

A presented credential is hashed and compared against the hash of every key with
`hmac.compare_digest`, all keys every time: neither the time taken nor an early exit
says which key, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
CLUSTER_SECRET_HEADER = "x-shardwire-cluster-secret"
# Services that answer without a credential.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}

# Reads the credential a call presents from its metadata (None: it presents none).
CredentialReader = Callable[[Sequence[tuple[str, Any]]], str | None]
# A client interceptor's continuation: starts the call with the given details.
Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


def check_token(token: str, what: str) -> str:
    """`token` if it can travel as a gRPC metadata value: printable ASCII, no spaces."""
    if not token:
        raise ValueError(f"{what} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"{what} must be printable ASCII without spaces")
    return token


def read_key_file(path: str) -> tuple[str, ...]:
    """API keys from a file, one per line; blank lines and lines starting with # are
    skipped. Errors name the line, never the key."""
    keys = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(check_token(key, f"the key on line {number} of {path}"))
    if not keys:
        raise ValueError(f"{path} holds no API key")
    return tuple(keys)


def read_secret_file(path: str) -> str:
    """A secret from a file (surrounding whitespace and a final newline dropped)."""
    return check_token(Path(path).read_text().strip(), f"the secret in {path}")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class KeySet:
    """Hashes of the accepted keys; `matches` compares in constant time over all."""

    def __init__(self, keys: Collection[str]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._digests = tuple(_digest(k) for k in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, presented: str) -> bool:
        digest = _digest(presented)
        found = False
        for key in self._digests:
            # No short-circuit: every key is compared whatever the outcome so far.
            found |= hmac.compare_digest(digest, key)
        return found


def bearer_token(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The token of an `authorization: Bearer TOKEN` entry."""
    for key, value in metadata:
        if key == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
            return ""
    return None


def cluster_secret(metadata: Sequence[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == CLUSTER_SECRET_HEADER and isinstance(value, str):
            return value
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when the credential `read` finds is one of `keys`; any
    other call (exempt services aside) ends with UNAUTHENTICATED before its handler
    runs or its request is parsed."""

    def __init__(
        self,
        keys: Collection[str],
        read: CredentialReader,
        what: str,
        exempt_prefixes: Sequence[str] = EXEMPT_PREFIXES,
    ) -> None:
        self._keys = KeySet(keys)
        self._read = read
        self._what = what
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(self._exempt):
            return await continuation(handler_call_details)
        presented = self._read(handler_call_details.invocation_metadata or ())
        if presented and self._keys.matches(presented):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        reason = f"missing {self._what}" if presented is None else f"invalid {self._what}"
        logger.info("refused %s: %s", method, reason)
        return _refusal(handler, reason)


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends the call with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    for kind, factory in _FACTORIES.items():
        if getattr(handler, kind) is not None:
            # No request deserializer: a refused request is never parsed.
            return factory(refuse, response_serializer=handler.response_serializer)
    return handler


def api_key_interceptor(keys: Collection[str]) -> AuthInterceptor:
    """The gateway's check: `authorization: Bearer KEY` with one of `keys`."""
    for i, key in enumerate(keys):
        check_token(key, f"API key {i + 1}")
    return AuthInterceptor(keys, bearer_token, "API key (authorization: Bearer KEY)")


def cluster_secret_interceptor(secret: str) -> AuthInterceptor:
    """A replica leader's check: the cluster secret in `x-shardwire-cluster-secret`."""
    check_token(secret, "the cluster secret")
    return AuthInterceptor((secret,), cluster_secret, "cluster secret")


class _AddMetadata:
    """Adds one metadata entry to every call it intercepts."""

    def __init__(self, entry: tuple[str, str]) -> None:
        self._entry = entry

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._entry)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Continuation,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


def secret_metadata(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send the cluster secret with every call of a channel
    (grpc.aio files an interceptor under one call shape only: one per shape)."""
    entry = (CLUSTER_SECRET_HEADER, check_token(secret, "the cluster secret"))
    return [kind(entry) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
