"""The CPU bound `shardwire bench kv` reports beside the slowest stage."""

from __future__ import annotations

import os

from serve.bench.kv import cpu_bound_ms


def test_cpu_bound_is_the_slowest_stage_or_the_work_over_the_cores() -> None:
    cores = os.cpu_count() or 1
    stages = {"encode_ms": 100.0, "receive_ms": 120.0, "decode_ms": 110.0}
    # On loopback the wire is CPU work too.
    assert cpu_bound_ms("loopback", stages) == max(120.0, 330.0 / cores)
    # On a shaped link the wire waits on the link: only encode and decode count.
    assert cpu_bound_ms("100", stages) == max(120.0, 210.0 / cores)
    slow_wire = {"encode_ms": 10.0, "receive_ms": 900.0, "decode_ms": 10.0}
    assert cpu_bound_ms("100", slow_wire) == 900.0
