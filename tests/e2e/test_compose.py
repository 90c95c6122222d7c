"""`docker-compose.yml` run without a Docker engine.

Each service becomes a process (the Dockerfile's ENTRYPOINT + the service's
command, with the service's environment) in a network namespace of its own. Each
Compose network is a Linux bridge in one more namespace; a service gets one veth
per network it joins, named eth0, eth1, ... in Compose's connection order
(priority), with a 10.232.x.y address. Service names resolve through
`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts: each name
maps to its address on a network the two services share, and the machine's
hostname to the service's first address, as in a container. Services start in
`depends_on` order, each waiting for its dependencies' conditions; health checks
run the file's own test command inside the service's namespace. Then a chat and
a translation go through the gateway from inside its namespace, and a `compose
down` (SIGTERM in reverse dependency order) must stop everything with exit 0.

Without namespaces (not root, no iproute2) the same runs on loopback: every
service on its own 127.232.x.y address, service names and 0.0.0.0 rewritten to
those addresses, each TP group's MASTER_PORT to a free port; the network checks
are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from serve.bench.netns import unavailable_reason
from serve.launch import free_port
from tests.fixtures.compose import (
    ComposeError,
    Service,
    load_compose,
    services,
    start_order,
)

SUBNET_PREFIX = "10.232"
LOOPBACK_PREFIX = "127.232"
START_TIMEOUT_S = 150.0
NETNS_REASON = unavailable_reason()


def _run(argv: Sequence[str]) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {res.stderr.strip()}")


@dataclass
class Stack:
    """The compose file's services as processes, in namespaces or on loopback."""

    by_name: dict[str, Service]
    networks: list[str]
    workdir: Path
    # Why the services run on loopback instead of in namespaces (None: namespaces).
    netns_reason: str | None
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    # service -> {network: address}; in loopback mode one address per service.
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    healthy: set[str] = field(default_factory=set)
    _namespaces: list[str] = field(default_factory=list)
    _master_ports: dict[str, str] = field(default_factory=dict)

    # -- naming ---------------------------------------------------------------

    @property
    def use_netns(self) -> bool:
        return self.netns_reason is None

    def netns(self, service: str) -> str:
        return f"swc-{self.tag}-{service}"

    @property
    def bridge_netns(self) -> str:
        return f"swc-{self.tag}-networks"

    def address(self, service: str) -> str:
        """The service's first address (its eth0, or its loopback address)."""
        return next(iter(self.addresses[service].values()))

    def resolve(self, viewer: str, service: str) -> str:
        """The address `viewer` reaches `service` at: on a network they share."""
        shared = [n for n in self.by_name[service].networks if n in self.by_name[viewer].networks]
        if not shared:
            raise ComposeError(f"{viewer} shares no network with {service}")
        return self.addresses[service][shared[0]]

    # -- set-up ---------------------------------------------------------------

    def create(self) -> None:
        base = 1 + int(self.tag, 16) % 200
        subnets = {net: (base + i) % 250 + 1 for i, net in enumerate(self.networks)}
        for i, name in enumerate(self.by_name):
            if self.use_netns:
                self.addresses[name] = {
                    net: f"{SUBNET_PREFIX}.{subnets[net]}.{i + 2}"
                    for net in self.by_name[name].networks
                }
            else:
                self.addresses[name] = {"lo": f"{LOOPBACK_PREFIX}.{base}.{i + 2}"}
        if self.use_netns:
            self._create_namespaces()

    def _create_namespaces(self) -> None:
        self._add_netns(self.bridge_netns)
        for i in range(len(self.networks)):
            _run(["ip", "-n", self.bridge_netns, "link", "add", f"br{i}", "type", "bridge"])
            _run(["ip", "-n", self.bridge_netns, "link", "set", f"br{i}", "up"])
        hostname = socket.gethostname()
        for s, (name, svc) in enumerate(self.by_name.items()):
            ns = self.netns(name)
            self._add_netns(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            for j, net in enumerate(svc.networks):
                peer = f"v{s}n{j}"
                _run(["ip", "link", "add", f"eth{j}", "netns", ns, "type", "veth",
                      "peer", "name", peer, "netns", self.bridge_netns])  # fmt: skip
                bridge = f"br{self.networks.index(net)}"
                _run(["ip", "-n", self.bridge_netns, "link", "set", peer, "master", bridge])
                _run(["ip", "-n", self.bridge_netns, "link", "set", peer, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[name][net]}/24",
                      "dev", f"eth{j}"])  # fmt: skip
                _run(["ip", "-n", ns, "link", "set", f"eth{j}", "up"])
            lines = ["127.0.0.1 localhost", f"{self.address(name)} {hostname}"]
            for other in self.by_name:
                with contextlib.suppress(ComposeError):
                    lines.append(f"{self.resolve(name, other)} {other}")
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(lines) + "\n")

    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)

    # -- processes ------------------------------------------------------------

    def _rewrite(self, service: str, value: str, is_env: bool = False) -> str:
        """Loopback mode: wildcard and local binds become the service's address, and
        a service name (before :port, or a whole environment value) the other's."""
        if self.use_netns:
            return value
        own = self.address(service)
        value = value.replace("0.0.0.0", own).replace("127.0.0.1", own)
        if is_env and value in self.by_name:
            return self.address(value)
        for other in self.by_name:
            value = re.sub(rf"(?<![\w.-]){re.escape(other)}(?=:\d)", self.address(other), value)
        return value

    def environment(self, service: str) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.workdir / "home"),
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
        }
        for key, value in self.by_name[service].environment.items():
            env[key] = self._rewrite(service, value, is_env=True)
        if not self.use_netns:
            if "GLOO_SOCKET_IFNAME" in env:
                env["GLOO_SOCKET_IFNAME"] = "lo"
            # The rendezvous store listens on every address: one free port per group.
            leader = self.by_name[service].environment.get("MASTER_ADDR")
            if leader is not None and "MASTER_PORT" in env:
                env["MASTER_PORT"] = self._master_ports.setdefault(leader, str(free_port()))
        return env

    def exec_argv(self, service: str, argv: Sequence[str]) -> list[str]:
        argv = [self._rewrite(service, a) for a in argv]
        if self.use_netns:
            return ["ip", "netns", "exec", self.netns(service), *argv]
        return argv

    def log(self, service: str) -> Path:
        return self.workdir / f"{service}.log"

    def start(self, service: str) -> None:
        with self.log(service).open("w") as out:
            self.procs[service] = subprocess.Popen(
                self.exec_argv(service, self.by_name[service].argv),
                env=self.environment(service),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(
        self, service: str, argv: Sequence[str], timeout_s: float = 60
    ) -> subprocess.CompletedProcess:
        """A command beside the service, as `docker compose exec` would run it."""
        return subprocess.run(
            self.exec_argv(service, argv),
            env=self.environment(service),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def tail(self, service: str, n: int = 30) -> str:
        lines = self.log(service).read_text(errors="replace").splitlines()
        return f"--- {service} ---\n" + "\n".join(lines[-n:])

    def wait_healthy(self, service: str, deadline: float) -> None:
        """Runs the service's health check until it passes (as Docker would during
        the start period), failing early if the process exits."""
        if service in self.healthy:
            return
        check = self.by_name[service].healthcheck
        if check is None:
            raise ComposeError(f"{service} is a service_healthy dependency without a healthcheck")
        while True:
            proc = self.procs[service]
            assert proc.poll() is None, (
                f"{service} exited with {proc.returncode}\n{self.tail(service)}"
            )
            try:
                res = self.run(service, check.argv, timeout_s=check.timeout_s + 5)
                if res.returncode == 0:
                    self.healthy.add(service)
                    return
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, f"{service} not healthy\n{self.tail(service)}"
            time.sleep(min(check.start_interval_s, check.interval_s))

    def up(self) -> None:
        """`docker compose up`: depends_on order and conditions, then every health check."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for name in start_order(self.by_name):
            for dep, condition in self.by_name[name].depends_on.items():
                if condition == "service_healthy":
                    self.wait_healthy(dep, deadline)
                elif condition == "service_started":
                    assert dep in self.procs
                else:
                    raise ComposeError(f"{name}: depends_on condition {condition} unsupported")
            self.start(name)
        for name, svc in self.by_name.items():
            if svc.healthcheck is not None:
                self.wait_healthy(name, deadline)

    def down(self, timeout_s: float = 45) -> dict[str, int | None]:
        """`docker compose down`: SIGTERM in reverse dependency order, each waited for."""
        codes: dict[str, int | None] = {}
        for name in reversed(start_order(self.by_name)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def destroy(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@contextlib.contextmanager
def compose_stack(workdir: Path, env: Mapping[str, str]) -> Iterator[Stack]:
    compose = load_compose(env=env)
    by_name = services(compose)
    networks = list(compose.get("networks", {"default": {}}))
    stack = Stack(by_name, networks, workdir, NETNS_REASON)
    (workdir / "home").mkdir(parents=True, exist_ok=True)
    try:
        try:
            stack.create()
        except RuntimeError as exc:  # namespaces exist, but bridges or veths fail here
            stack.destroy()
            stack = Stack(by_name, networks, workdir, str(exc))
            stack.create()
        stack.up()
        yield stack
    finally:
        stack.destroy()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The defaults of the file (tiny model, codec none), with a short TP timeout so
    # a broken group would show here quickly.
    with compose_stack(tmp_path_factory.mktemp("compose"), {"SHARDWIRE_TP_TIMEOUT": "20"}) as s:
        yield s


def _gateway_target(stack: Stack) -> str:
    gateway = stack.by_name["gateway"]
    port = gateway.argv[gateway.argv.index("--port") + 1]
    return f"127.0.0.1:{port}"


def test_gateway_serves_chat_and_translation(stack: Stack) -> None:
    target = _gateway_target(stack)
    chat = stack.run(
        "gateway", ["shardwire", "chat", "--target", target, "--max-tokens", "12", "--stats",
                    "Hello from compose"],
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr + stack.tail("gateway")
    assert re.search(r"\d+ prompt .* \+ \d+ tokens", chat.stderr), chat.stderr
    translation = stack.run(
        "gateway", ["shardwire", "translate", "--target", target, "--from", "en", "--to", "de",
                    "--max-tokens", "8", "--stats", "Good morning"],
    )  # fmt: skip
    assert translation.returncode == 0, translation.stderr
    assert re.search(r"\d+ prompt .* \+ \d+ tokens", translation.stderr), translation.stderr
    models = stack.run("gateway", ["shardwire", "models", "--target", target])
    assert models.returncode == 0, models.stderr
    assert "replicas 2" in models.stdout and "tp 2" in models.stdout, models.stdout


def test_metrics_ports_answer(stack: Stack) -> None:
    fetch = (
        "import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    for service in ("gateway", "shard-a0", "shard-b0"):
        argv = stack.by_name[service].argv
        port = argv[argv.index("--metrics-port") + 1]
        host = "127.0.0.1" if service == "gateway" else service
        res = stack.run("gateway", ["python3", "-c", fetch, f"http://{host}:{port}/metrics"])
        assert res.returncode == 0, res.stderr
        assert "shardwire_" in res.stdout


def test_services_run_in_their_own_network_namespaces(stack: Stack) -> None:
    if not stack.use_netns:
        pytest.skip(f"network part skipped, services ran on loopback: {stack.netns_reason}")
    own = os.readlink("/proc/self/ns/net")
    spaces = {name: os.readlink(f"/proc/{p.pid}/ns/net") for name, p in stack.procs.items()}
    assert len(set(spaces.values())) == len(spaces) and own not in spaces.values()
    for viewer in stack.by_name:
        res = stack.run(viewer, ["getent", "hosts", "shard-a0"])
        assert res.stdout.split()[0] == stack.resolve(viewer, "shard-a0"), res.stdout
    # Rank 1 reaches its leader over the internal network only.
    assert stack.by_name["shard-a1"].networks == ("shards",)
    assert stack.resolve("shard-a1", "shard-a0").startswith(SUBNET_PREFIX)


def test_compose_down_stops_every_service_with_exit_0(stack: Stack) -> None:
    codes = stack.down()
    tails = "\n".join(stack.tail(n) for n, c in codes.items() if c != 0)
    assert codes == dict.fromkeys(codes, 0), f"{codes}\n{tails}"
