"""clients.retry reads the gateway's retry-after-ms hint from a refused call."""

from __future__ import annotations

import grpc

from clients.retry import retry_after_ms


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailing: tuple) -> None:
        self._code = code
        self._trailing = trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self) -> tuple:
        return self._trailing


def test_the_hint_of_an_overload_refusal() -> None:
    """Pass: the hint is read from RESOURCE_EXHAUSTED only, and malformed ones are None."""
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after_ms(Refused(exhausted, (("retry-after-ms", "250"),))) == 250
    assert retry_after_ms(Refused(exhausted, ())) is None
    assert retry_after_ms(Refused(exhausted, (("retry-after-ms", "soon"),))) is None
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert retry_after_ms(Refused(unavailable, (("retry-after-ms", "250"),))) is None
