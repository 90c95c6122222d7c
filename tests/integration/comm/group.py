"""Runs a function on N real gloo ranks (spawned processes) and collects what
each rank reports: a JSON object of check name -> "ok" or the failure."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from serve.launch import free_port

Checks = dict[str, str]
GROUP_TIMEOUT_S = 30.0


def _entry(fn: Callable[[int, int], Checks], rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    try:
        checks = fn(rank, world)
    except BaseException:  # reported to the test; the exit code says it too
        Path(out).write_text(json.dumps({"__crash__": traceback.format_exc()}))
        raise
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    Path(out).write_text(json.dumps(checks))


def run_group(fn: Callable[[int, int], Checks], world: int, timeout_s: float = 120) -> list[Checks]:
    """fn(rank, world) on `world` spawned ranks of one gloo group; every rank's
    checks, in rank order. Ranks still running after timeout_s are killed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sw-comm-test-") as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world, port, outs[r]), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} reported nothing (exit code {procs[r].exitcode})")
            checks = json.loads(Path(path).read_text())
            if "__crash__" in checks:
                raise AssertionError(f"rank {r} crashed:\n{checks['__crash__']}")
            results.append(checks)
        return results


class CheckList:
    """Collects named checks on one rank; a failed assertion is recorded, not
    raised, so the ranks keep issuing the same collectives."""

    def __init__(self) -> None:
        self.results: Checks = {}

    @contextlib.contextmanager
    def check(self, name: str):
        try:
            yield
        except AssertionError as exc:
            self.results[name] = f"FAILED: {exc}"
        else:
            self.results.setdefault(name, "ok")
