"""`shardwire bench affinity`: the agreement count and the report of a run."""

from __future__ import annotations

from serve.bench.affinity import ModeResult, TurnRecord, agreement, report


def _result(mode: str, answers: list[tuple[int, ...]], cached: int, ttft: float) -> ModeResult:
    turns = [
        TurnRecord(dialogue=0, turn=t + 1, prompt_tokens=100, cached_tokens=cached,
                   ttft_ms=ttft, token_ids=ids)
        for t, ids in enumerate(answers)
    ]  # fmt: skip
    return ModeResult(mode, 2.0, cached / 100, ttft, ttft * 2, turns)


def test_agreement_counts_positions_and_the_longer_answer() -> None:
    a = _result("prefix affinity", [(1, 2, 3), (4, 5)], 60, 10.0)
    b = _result("load only", [(1, 9, 3), (4, 5, 6)], 30, 20.0)
    assert agreement(a, b) == (4, 6)


def test_report_compares_the_two_routings() -> None:
    a = _result("prefix affinity", [(1,), (2,)], 60, 10.0)
    b = _result("load only", [(1,), (2,)], 30, 20.0)
    text = report({"prefix affinity": [a], "load only": [b]}, 2, 2)
    assert "| prefix affinity | 60.0% | 10 | 20 | 2.0 |" in text
    assert "| load only | 30.0% | 20 | 40 | 2.0 |" in text
    assert "TTFT median 0.50x, workload time 1.00x" in text
    assert "2/2 (100.0%)" in text
