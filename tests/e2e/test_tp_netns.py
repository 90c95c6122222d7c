"""A TP=2 replica whose ranks live on two emulated hosts (network namespaces
joined by a veth pair shaped to 100 Mbit/s), serving requests through the
gateway. Skips when namespaces cannot be made here."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from serve.bench.netns import netns_pair, unavailable_reason
from tests.fixtures.hf_checkpoints import CheckpointFactory
from tests.integration.test_parity_grpc import _greedy_reference, _prompt

NUM_TOKENS = 24
SHARD_PORT, GATEWAY_PORT, MASTER_PORT = 50061, 50051, 29511

CLIENT = """
import json, sys
from clients.client import Client
with Client(sys.argv[1], timeout=60) as c:
    ids = [t for ch in c.generate(json.loads(sys.argv[2]), max_tokens=int(sys.argv[3]),
                                 temperature=0.0, ignore_eos=True) for t in ch.token_ids]
print(json.dumps(ids))
"""

reason = unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"no network namespaces: {reason}")


def test_tp2_across_namespaces_serves_through_the_gateway(
    checkpoint_factory: CheckpointFactory,
) -> None:
    ckpt = checkpoint_factory("llama")
    prompt = _prompt(ckpt, 9, seed=21)
    reference = _greedy_reference(ckpt, prompt, max_tokens=NUM_TOKENS)
    cli = [sys.executable, "-m", "serve.cli", "--log-level", "warning"]
    with netns_pair(rate_mbit=100) as pair:
        addr_a, _ = pair.addresses
        dev_a, dev_b = pair.devices
        common = ["--model", str(ckpt.path), "--tp-size", "2", "--master-addr", addr_a,
                  "--master-port", str(MASTER_PORT), "--num-threads", "1", "--kv-cache-mb", "16",
                  "--metrics-port", "-1"]  # fmt: skip
        pair.popen(
            0,
            ["env", f"GLOO_SOCKET_IFNAME={dev_a}", *cli, "shard", "--tp-rank", "0",
             "--port", str(SHARD_PORT), *common],
        )  # fmt: skip
        pair.popen(
            1, ["env", f"GLOO_SOCKET_IFNAME={dev_b}", *cli, "shard", "--tp-rank", "1", *common]
        )
        pair.popen(
            0,
            [*cli, "gateway", "--model", str(ckpt.path), "--port", str(GATEWAY_PORT),
             "--replica", f"127.0.0.1:{SHARD_PORT}", "--metrics-port", "-1"],
        )  # fmt: skip
        argv = pair.exec_argv(
            0,
            [sys.executable, "-c", CLIENT, f"127.0.0.1:{GATEWAY_PORT}", json.dumps(prompt),
             str(NUM_TOKENS)],
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout.strip().splitlines()[-1]) == reference
