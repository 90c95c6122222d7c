"""Two emulated hosts: network namespaces joined by a veth pair, each end
rate-limited by `tc tbf` (netem is not available on these kernels).

    with netns_pair(rate_mbit=100) as pair:
        proc = pair.popen(0, [sys.executable, "-m", "..."], env=...)

Namespaces and links get unique names, addresses stay inside the pair
(10.231.<subnet>.1 and .2 on the veth), and everything is torn down on exit,
failures included: the processes started through the pair first, then the
namespaces (which take their veth ends with them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

SUBNET_PREFIX = "10.231"
# Queueing limit of the shaper: how long a packet may wait in the tbf queue.
TBF_LATENCY = "50ms"
MIN_BURST_BITS = 32_000


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2, no permission)."""


def _run(argv: Sequence[str]) -> None:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {res.stderr.strip() or res.returncode}")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    name = f"swprobe-{secrets.token_hex(4)}"
    try:
        _run(["ip", "netns", "add", name])
    except NetnsUnavailable as exc:
        return str(exc)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def tbf_burst(rate_mbit: float) -> str:
    """Bucket size: about 1 ms of traffic, at least 32 kbit."""
    return f"{max(MIN_BURST_BITS, int(rate_mbit * 1e6 / 1000)) // 1000}kbit"


@dataclass
class NetnsPair:
    """Two namespaces (side 0 and side 1) with one veth link between them."""

    tag: str
    subnet: int
    rate_mbit: float | None
    burst: str | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def namespaces(self) -> tuple[str, str]:
        return f"sw-{self.tag}-a", f"sw-{self.tag}-b"

    @property
    def devices(self) -> tuple[str, str]:
        return f"sw{self.tag}a", f"sw{self.tag}b"  # <= 15 characters

    @property
    def addresses(self) -> tuple[str, str]:
        return f"{SUBNET_PREFIX}.{self.subnet}.1", f"{SUBNET_PREFIX}.{self.subnet}.2"

    def exec_argv(self, side: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[side], *argv]

    def popen(self, side: int, argv: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """Starts argv inside one side's namespace (its own session, so it and
        its children are stopped together on exit)."""
        proc = subprocess.Popen(self.exec_argv(side, argv), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def create(self) -> None:
        ns_a, ns_b = self.namespaces
        dev_a, dev_b = self.devices
        for ns in (ns_a, ns_b):
            _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", dev_a, "type", "veth", "peer", "name", dev_b])
        for ns, dev, addr in zip((ns_a, ns_b), (dev_a, dev_b), self.addresses, strict=True):
            _run(["ip", "link", "set", dev, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.rate_mbit is not None:
                burst = self.burst or tbf_burst(self.rate_mbit)
                _run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf"]
                    + ["rate", f"{self.rate_mbit:g}mbit", "burst", burst, "latency", TBF_LATENCY]
                )
        logger.info(
            "netns pair %s/%s up: %s <-> %s, %s",
            ns_a,
            ns_b,
            *self.addresses,
            "unshaped" if self.rate_mbit is None else f"tbf {self.rate_mbit:g} Mbit/s each way",
        )

    def stop_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def destroy(self) -> None:
        self.stop_processes()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        # A veth left in the root namespace (creation failed half way).
        for dev in self.devices:
            subprocess.run(["ip", "link", "del", dev], capture_output=True, check=False)


@contextlib.contextmanager
def netns_pair(
    rate_mbit: float | None, burst: str | None = None, subnet: int | None = None
) -> Iterator[NetnsPair]:
    """Two fresh namespaces joined by a veth pair, shaped to rate_mbit in each
    direction (None: unshaped). Raises NetnsUnavailable if they cannot be made."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    tag = secrets.token_hex(4)
    pair = NetnsPair(
        tag, subnet if subnet is not None else 1 + int(tag, 16) % 250, rate_mbit, burst
    )
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()
