"""One rank of the namespace test, started as `python -m` inside a namespace.

Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (GLOO_SOCKET_IFNAME picks
the veth); prints one JSON line of named checks (rank 0) and exits 0."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from serve.comm.collectives import CommConfig, Communicator, tree_sum
from serve.comm.linkmodel import LinkModel
from tests.integration.comm.workers import bit_equal, make_input, same_on_all_ranks


def main() -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        plain = Communicator(rank, world, CommConfig())
        checks: dict[str, object] = {}
        for n in (896, 512 * 1024):
            xs = [make_input(r, n, torch.bfloat16) for r in range(world)]
            start = time.perf_counter()
            out = plain.all_reduce(xs[rank])
            checks[f"seconds n={n}"] = time.perf_counter() - start
            checks[f"none exact n={n}"] = bit_equal(out, tree_sum(xs))
        link = LinkModel.probe(plain, rank, world)
        checks["probe mbit"] = link.beta_bytes_per_s * 8 / 1e6
        auto = Communicator(rank, world, CommConfig(codec="auto", accuracy="lossy"), link=link)
        x = make_input(rank, 512 * 1024, torch.bfloat16)
        out = auto.all_reduce(x)
        spec = auto.spec_for(x)
        checks["auto codec 1 MiB"] = "none" if spec is None else spec.label
        checks["auto identical"] = same_on_all_ranks(plain, out)
        exact = tree_sum([make_input(r, 512 * 1024, torch.bfloat16).float() for r in range(world)])
        checks["auto rel err"] = float((out.float() - exact).norm() / exact.norm())
        if rank == 0:
            print(json.dumps(checks), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
