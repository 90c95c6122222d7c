"""`shardwire up` with API keys and TLS, as a real process tree driven by the client
CLI: the flags reach the gateway, the replicas get a random cluster secret through
their environment (never their command line), and every internal port (Shard API,
TP rendezvous, gloo) listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from shardwire.v1 import shard_pb2, shard_pb2_grpc

from clients.client import Client
from serve.config import CLUSTER_SECRET_ENV
from serve.gateway.auth import CLUSTER_SECRET_HEADER
from serve.launch import free_port
from tests.fixtures.certs import CertAuthority

CLI = [sys.executable, "-m", "serve.cli"]
KEY = "e2e-key-3f9c01b7a2d45e68"


@dataclass
class Up:
    proc: subprocess.Popen
    target: str  # by name, as in the server certificate
    ca: Path
    key_file: Path
    log: Path

    def children(self) -> list[int]:
        text = " ".join(
            p.read_text() for p in Path(f"/proc/{self.proc.pid}/task").glob("*/children")
        )
        return [int(pid) for pid in text.split()]

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, *args], capture_output=True, text=True, timeout=60, check=False, env=env
        )


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("auth-tls")
    ca = CertAuthority(workdir)
    server = ca.issue("server", server=True)
    key_file = workdir / "api-keys"
    key_file.write_text(f"# gateway clients\n{KEY}\n")
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in (CLUSTER_SECRET_ENV, "GLOO_SOCKET_IFNAME")
    }
    log = workdir / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "--log-level", "info", "up", "--port", str(port), "--tp", "2",
             "--kv-cache-mb", "16", "--num-threads", "1", "--metrics-port", "-1",
             "--api-key-file", str(key_file), "--tls-cert", str(server.cert),
             "--tls-key", str(server.key)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    deployment = Up(proc, f"localhost:{port}", ca.cert, key_file, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with Client(deployment.target, 2, api_key=KEY, tls_ca=str(ca.cert)) as client:
                    client.list_models()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
        yield deployment
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_cli_needs_the_key_and_the_ca(up: Up) -> None:
    """Pass: `shardwire chat` with --tls-ca and --api-key-file streams an answer (exit
    0), as does the key from $SHARDWIRE_API_KEY; without a key it exits 1 with
    UNAUTHENTICATED, and in plaintext it exits 1 with UNAVAILABLE."""
    common = ["--target", up.target, "--max-tokens", "4", "--stats"]
    tls = ["--tls-ca", str(up.ca)]
    ok = up.cli("chat", *common, *tls, "--api-key-file", str(up.key_file), "hi")
    assert ok.returncode == 0, ok.stderr
    assert "+ 4 tokens" in ok.stderr, ok.stderr
    from_env = up.cli(
        "models", "--target", up.target, *tls, env={**os.environ, "SHARDWIRE_API_KEY": KEY}
    )
    assert from_env.returncode == 0 and "tp 2" in from_env.stdout, from_env.stderr
    no_key = up.cli(
        "chat",
        *common,
        *tls,
        "hi",
        env={k: v for k, v in os.environ.items() if k != "SHARDWIRE_API_KEY"},
    )
    assert no_key.returncode == 1 and "UNAUTHENTICATED" in no_key.stderr, no_key.stderr
    plaintext = up.cli("chat", *common, "--api-key", KEY, "hi")
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr


def _shard_process(up: Up) -> tuple[int, list[str]]:
    for pid in up.children():
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "shard" in args and args[args.index("--tp-rank") + 1] == "0":
            return pid, args
    raise AssertionError("no replica leader among the launcher's children")


def test_replicas_get_a_random_secret_off_their_command_line(up: Up) -> None:
    """Pass: the leader's environment holds a generated cluster secret (>= 32
    characters) that appears on no child's command line; a Shard.Status straight to
    the leader fails with UNAUTHENTICATED without it and answers with it."""
    pid, args = _shard_process(up)
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    secret = next(e.split("=", 1)[1] for e in environ if e.startswith(f"{CLUSTER_SECRET_ENV}="))
    assert len(secret) >= 32
    for child in up.children():
        assert secret not in Path(f"/proc/{child}/cmdline").read_bytes().decode()
    target = f"127.0.0.1:{args[args.index('--port') + 1]}"
    with grpc.insecure_channel(target) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Status(shard_pb2.StatusRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Status(
            shard_pb2.StatusRequest(), metadata=((CLUSTER_SECRET_HEADER, secret),), timeout=5
        )
        assert reply.tp_size == 2


def _listening(pid: int) -> list[str]:
    """host:port of every TCP socket process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            # 32-bit words in host (little-endian) order.
            raw = b"".join(
                bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
            )
            host = ipaddress.ip_address(raw)
            if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
                host = host.ipv4_mapped  # an IPv6 socket on an IPv4 address
            found.append(f"{host}:{int(port, 16)}")
    return found


def test_internal_ports_listen_on_loopback_only(up: Up) -> None:
    """Pass: every socket the replica's two rank processes listen on (the Shard API,
    the TP rendezvous store, gloo) is bound to 127.0.0.1 (IPv4, or IPv4-mapped on an
    IPv6 socket), and there are at least three of them."""
    sockets = [s for pid in up.children() for s in _listening(pid)]
    assert len(sockets) >= 3, sockets
    assert all(s.startswith("127.0.0.1:") for s in sockets), sockets
