"""The CPU floor `shardwire bench kv` reports beside the slowest stage, and the
targets it prints from a run's rows."""

from __future__ import annotations

from serve.bench.kv import cpu_floor_ms, slowest_ms, targets


def _row(mode: str, total: float, stages: tuple[float, float, float], cpu=(0.0, 0.0)) -> dict:
    encode, wire, decode = stages
    return {
        "context": 1024, "codec": "int8", "mode": mode, "raw_bytes": 4, "wire_bytes": 1,
        "fp16_ratio": 0.5, "total_ms": total, "encode_ms": encode, "receive_ms": wire,
        "decode_ms": decode, "source_cpu_ms": cpu[0], "target_cpu_ms": cpu[1],
    }  # fmt: skip


def test_cpu_floor_is_the_slowest_stage_or_the_cpu_time_over_the_cores() -> None:
    sequential = _row("sequential", 300.0, (100.0, 120.0, 110.0))
    assert slowest_ms(sequential) == 120.0
    # Both replicas spent 400 ms of CPU: on 2 cores the move cannot take under 200.
    busy = _row("pipelined", 210.0, (100.0, 200.0, 100.0), cpu=(220.0, 180.0))
    assert cpu_floor_ms(busy, sequential, cores=2) == 200.0
    assert cpu_floor_ms(busy, sequential, cores=8) == 120.0  # the slowest stage
    idle = _row("pipelined", 130.0, (100.0, 120.0, 100.0), cpu=(60.0, 50.0))
    assert cpu_floor_ms(idle, sequential, cores=2) == 120.0


def test_targets_name_the_cells_over_the_ratio_and_how_busy_the_cores_were() -> None:
    moves = [
        _row("sequential", 300.0, (100.0, 20.0, 90.0)),
        _row("pipelined", 150.0, (100.0, 140.0, 95.0), cpu=(140.0, 130.0)),
    ]
    lines = targets({"loopback": {"moves": moves, "pauses": []}})
    ratio = next(line for line in lines if line.startswith("pipelined / slowest"))
    assert "median 1.50, worst 1.50" in ratio and ratio.endswith("missed")
    over = next(line for line in lines if line.startswith("cells over 1.2"))
    assert "1 of 1" in over and "1.80-1.80 of" in over
    moves[1] = _row("pipelined", 110.0, (100.0, 105.0, 95.0), cpu=(120.0, 100.0))
    lines = targets({"loopback": {"moves": moves, "pauses": []}})
    assert next(line for line in lines if line.startswith("pipelined / slowest")).endswith("met")
    assert not any(line.startswith("cells over 1.2") for line in lines)
