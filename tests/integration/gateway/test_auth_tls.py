"""API keys, TLS and mutual TLS on the gateway, and the cluster secret and TLS on
the internal gateway -> replica link, with real servers on real ports (tiny model)
and the SDK as the client. Certificates are made per run (tests/fixtures/certs.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from clients.client import AsyncClient, Client
from serve.config import TLSClientConfig, TLSServerConfig
from serve.errors import Unavailable
from serve.gateway.auth import CLUSTER_SECRET_HEADER
from tests.fixtures.certs import CertAuthority, Issued
from tests.fixtures.servers import Servers, servers

KEYS = ("key-one-5b2f0c9e71d4", "key-two-a83e66d1f0b7")
SECRET = "cluster-secret-7d1e90a2c4b6f3"
TIMEOUT_S = 20.0


@dataclass
class Stack:
    servers: Servers
    ca: CertAuthority
    client: Issued  # signed by `ca`
    stranger: Issued  # a client certificate from another CA
    replica: str  # plaintext leader holding SECRET
    keyed: str  # gateway with KEYS
    tls: str  # gateway serving TLS
    mtls: str  # gateway requiring client certificates
    tls_replica: str  # leader serving mutual TLS and holding SECRET
    via_tls_replica: str  # gateway reaching tls_replica over mutual TLS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pki = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(pki)
    server = ca.issue("server", server=True)
    client = ca.issue("client", server=False)
    stranger = CertAuthority(pki, "other CA").issue("stranger", server=False)
    tls = TLSServerConfig(cert_file=str(server.cert), key_file=str(server.key))
    mtls = TLSServerConfig(str(server.cert), str(server.key), client_ca_file=str(ca.cert))
    for s in servers():
        replica = s.shard(cluster_secret=SECRET)
        tls_replica = s.shard(cluster_secret=SECRET, tls=mtls)
        link = TLSClientConfig(
            ca_file=str(ca.cert), cert_file=str(client.cert), key_file=str(client.key)
        )
        yield Stack(
            servers=s,
            ca=ca,
            client=client,
            stranger=stranger,
            replica=replica,
            keyed=s.gateway([replica], api_keys=KEYS, cluster_secret=SECRET),
            tls=s.gateway([replica], tls=tls, cluster_secret=SECRET),
            mtls=s.gateway([replica], tls=mtls, cluster_secret=SECRET),
            tls_replica=tls_replica,
            via_tls_replica=s.gateway(
                [tls_replica.replace("127.0.0.1", "localhost")],
                cluster_secret=SECRET,
                replica_tls=link,
            ),
        )


def _generate(client: Client) -> list[int]:
    chunks = list(client.generate("hello there", max_tokens=4, ignore_eos=True))
    assert chunks[-1].finish_reason == "length"
    return [t for c in chunks for t in c.token_ids]


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code `call` fails with."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _localhost(address: str) -> str:
    return address.replace("127.0.0.1", "localhost")


def test_call_without_a_token_is_unauthenticated(stack: Stack) -> None:
    """Pass: ListModels and Generate without an authorization entry end with
    UNAUTHENTICATED, and the message says the key is missing."""
    with Client(stack.keyed, timeout=TIMEOUT_S) as client:
        assert _code(client.list_models) is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            _generate(client)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in info.value.details()


def test_call_with_a_bad_token_is_unauthenticated(stack: Stack) -> None:
    """Pass: a wrong key, a prefix of a valid key and a valid key under another
    scheme (Basic) all end with UNAUTHENTICATED."""
    with Client(stack.keyed, timeout=TIMEOUT_S, api_key="not-a-key") as client:
        assert _code(lambda: _generate(client)) is grpc.StatusCode.UNAUTHENTICATED
    with Client(stack.keyed, timeout=TIMEOUT_S, api_key=KEYS[0][:-1]) as client:
        assert _code(client.list_models) is grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(stack.keyed) as channel:
        list_models = channel.unary_unary("/shardwire.v1.Inference/ListModels")
        basic = (("authorization", f"Basic {KEYS[0]}"),)
        assert _code(lambda: list_models(b"", metadata=basic, timeout=5)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_call_with_a_good_token_is_served(stack: Stack) -> None:
    """Pass: with either configured key, ListModels answers and Generate streams its
    4 tokens (OK); the async client does the same."""
    for key in KEYS:
        with Client(stack.keyed, timeout=TIMEOUT_S, api_key=key) as client:
            assert client.list_models()[0].id == "tiny"
            assert len(_generate(client)) == 4

    async def run() -> int:
        async with AsyncClient(stack.keyed, timeout=TIMEOUT_S, api_key=KEYS[1]) as client:
            return len([c async for c in client.generate("hi", max_tokens=3, ignore_eos=True)])

    assert asyncio.run(run()) >= 1


def test_health_and_reflection_answer_without_a_token(stack: Stack) -> None:
    """Pass: grpc.health.v1 Check without any metadata says SERVING (server and
    Inference service), and reflection lists the Inference service."""
    with grpc.insecure_channel(stack.keyed) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "shardwire.v1.Inference"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert "shardwire.v1.Inference" in names


def test_tls_round_trip(stack: Stack) -> None:
    """Pass: a client trusting the test CA streams tokens from the TLS gateway,
    by name (localhost) and by IP (127.0.0.1, in the certificate's SAN); a
    plaintext client gets no answer (UNAVAILABLE)."""
    for target in (_localhost(stack.tls), stack.tls):
        with Client(target, timeout=TIMEOUT_S, tls_ca=str(stack.ca.cert)) as client:
            assert len(_generate(client)) == 4
    with Client(stack.tls, timeout=5) as plaintext:
        assert _code(plaintext.list_models) is grpc.StatusCode.UNAVAILABLE


def test_mtls_round_trip(stack: Stack) -> None:
    """Pass: with the CA and a client certificate the CA signed, the sync and async
    clients are served by the gateway that requires client certificates."""
    tls = {
        "tls_ca": stack.ca.cert.read_bytes(),  # PEM bytes work as well as paths
        "tls_cert": str(stack.client.cert),
        "tls_key": str(stack.client.key),
    }
    with Client(_localhost(stack.mtls), timeout=TIMEOUT_S, **tls) as client:
        assert len(_generate(client)) == 4

    async def run() -> int:
        async with AsyncClient(_localhost(stack.mtls), timeout=TIMEOUT_S, **tls) as client:
            return len([c async for c in client.generate("hi", max_tokens=3, ignore_eos=True)])

    assert asyncio.run(run()) >= 1


def test_mtls_refuses_a_client_without_the_client_certificate(stack: Stack) -> None:
    """Pass: against the mutual-TLS gateway, a client that trusts the CA but has no
    certificate, and one whose certificate another CA signed, both fail with
    UNAVAILABLE (the handshake is refused) and get no model list."""
    target = _localhost(stack.mtls)
    with Client(target, timeout=5, tls_ca=str(stack.ca.cert)) as client:
        assert _code(client.list_models) is grpc.StatusCode.UNAVAILABLE
    stranger = {"tls_cert": str(stack.stranger.cert), "tls_key": str(stack.stranger.key)}
    with Client(target, timeout=5, tls_ca=str(stack.ca.cert), **stranger) as client:
        assert _code(client.list_models) is grpc.StatusCode.UNAVAILABLE


def _shard_status(channel: grpc.Channel, secret: str | None) -> shard_pb2.StatusResponse:
    metadata = ((CLUSTER_SECRET_HEADER, secret),) if secret is not None else None
    stub = shard_pb2_grpc.ShardStub(channel)
    return stub.Status(shard_pb2.StatusRequest(), metadata=metadata, timeout=5)


def test_shard_call_without_the_cluster_secret_is_unauthenticated(stack: Stack) -> None:
    """Pass: straight to the leader, Status and Generate without the secret, and
    Status with a wrong one, end with UNAUTHENTICATED while health says SERVING
    without it and Status answers with it; the gateway holding the secret serves
    Generate through that leader, and one without it never finds a usable replica
    (Unavailable at start-up)."""
    with grpc.insecure_channel(stack.replica) as channel:
        assert _code(lambda: _shard_status(channel, None)) is grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _shard_status(channel, "wrong")) is grpc.StatusCode.UNAUTHENTICATED
        request = shard_pb2.ShardGenerateRequest(request_id="no-secret", prompt_token_ids=[5, 6])
        generate = shard_pb2_grpc.ShardStub(channel).Generate
        assert _code(lambda: list(generate(request, timeout=5))) is (
            grpc.StatusCode.UNAUTHENTICATED
        )
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="shardwire.v1.Shard"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert _shard_status(channel, SECRET).model == "tiny"
    with Client(stack.keyed, timeout=TIMEOUT_S, api_key=KEYS[0]) as client:
        assert len(_generate(client)) == 4
    with pytest.raises(Unavailable):
        stack.servers.gateway([stack.replica], startup_timeout_s=1.0)


def test_gateway_reaches_a_replica_over_mutual_tls(stack: Stack) -> None:
    """Pass: the gateway that trusts the CA and presents the client certificate (and
    the secret) streams tokens from the mutual-TLS leader; a direct channel that
    trusts the CA but has no client certificate is refused (UNAVAILABLE)."""
    with Client(stack.via_tls_replica, timeout=TIMEOUT_S) as client:
        assert len(_generate(client)) == 4
    credentials = grpc.ssl_channel_credentials(stack.ca.cert.read_bytes())
    with grpc.secure_channel(_localhost(stack.tls_replica), credentials) as channel:
        assert _code(lambda: _shard_status(channel, SECRET)) is grpc.StatusCode.UNAVAILABLE


def _idle_free_blocks(channel: grpc.Channel, timeout_s: float = 10.0) -> int:
    """kv_blocks_free once the replica runs nothing (asked with the secret)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _shard_status(channel, SECRET)
        if status.num_running == 0 and status.num_waiting == 0:
            return status.kv_blocks_free
        assert time.monotonic() < deadline, "replica did not go idle"
        time.sleep(0.02)


def test_cancel_crosses_the_secret_carrying_link(stack: Stack) -> None:
    """Pass: a client closing a long stream through the keyed gateway (whose replica
    calls carry the secret) aborts the request on the replica: its KV blocks are
    back and nothing runs there within 10 s."""
    with grpc.insecure_channel(stack.replica) as channel:
        baseline = _idle_free_blocks(channel)
        with Client(stack.keyed, timeout=TIMEOUT_S, api_key=KEYS[0]) as client:
            stream = client.generate("cancel me", max_tokens=1000, ignore_eos=True)
            for _ in range(3):
                assert next(stream).finish_reason is None
            assert _shard_status(channel, SECRET).kv_blocks_free < baseline
            stream.close()
            assert _idle_free_blocks(channel) == baseline
