"""Two ranks on two emulated hosts: network namespaces joined by a veth pair
shaped with `tc tbf` to 100 Mbit/s. Skips when namespaces cannot be made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.bench.netns import netns_pair, unavailable_reason

ROOT = Path(__file__).resolve().parents[3]
MASTER_PORT = 29517
RATE_MBIT = 100

reason = unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"no network namespaces: {reason}")


def test_all_reduce_across_a_shaped_veth_link() -> None:
    with netns_pair(RATE_MBIT, burst="32kbit") as pair:
        procs = []
        for rank in range(2):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": pair.addresses[0],
                "MASTER_PORT": str(MASTER_PORT),
                "GLOO_SOCKET_IFNAME": pair.devices[rank],
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
                ),
            }
            procs.append(
                pair.popen(
                    rank,
                    [sys.executable, "-m", "tests.integration.comm.netns_rank"],
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=90) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err}"
    checks = json.loads(outputs[0][0].strip().splitlines()[-1])
    print(checks)
    assert checks["none exact n=896"] is True
    assert checks["none exact n=524288"] is True
    # 1 MiB each way at 100 Mbit/s takes >= 84 ms: the shaper is in the path.
    assert checks["seconds n=524288"] > 0.06, checks
    assert 30 < checks["probe mbit"] < 130, checks
    assert checks["auto codec 1 MiB"] != "none", checks
    assert checks["auto identical"] is True
    assert checks["auto rel err"] < 0.25, checks


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_namespaces_and_their_processes_go_away_on_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), netns_pair(None) as pair:
        names = set(pair.namespaces)
        assert names <= _namespaces()
        sleeper = pair.popen(1, ["sleep", "60"])
        raise RuntimeError("boom")
    assert not names & _namespaces()
    assert sleeper.poll() is not None
