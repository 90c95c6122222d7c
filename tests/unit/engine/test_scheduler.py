from serve.config import EngineConfig
from serve.engine.kv_cache import KVCacheManager
from serve.engine.request import FinishReason, Request, SamplingParams
from serve.engine.scheduler import Scheduler


def _sched(num_blocks: int = 64, budget: int = 32, block_size: int = 4) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, max_num_batched_tokens=budget)
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size), max_model_len=1024)


def _req(rid: str, n: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=max_tokens), frozenset({999}))


def _advance(s: Scheduler, token: int = 1) -> None:
    out = s.schedule()
    sampled = {r.request_id: token for r in out.decodes}
    for r, n in out.prefills:
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[r.request_id] = token
    s.update(out, sampled)


def test_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    s = _sched(budget=16)
    s.add(_req("a", 40))
    sizes = []
    for _ in range(3):
        out = s.schedule()
        sizes.append(out.num_tokens)
        s.update(out, {})
    assert sizes == [16, 16, 8]


def test_decodes_come_first_and_a_new_prompt_fills_the_rest() -> None:
    s = _sched(budget=10)
    s.add(_req("a", 5))
    _advance(s)  # a prefilled, one token out
    s.add(_req("b", 30))
    out = s.schedule()
    assert [r.request_id for r in out.decodes] == ["a"]
    assert [(r.request_id, n) for r, n in out.prefills] == [("b", 9)]


def test_finishing_on_max_tokens_frees_blocks() -> None:
    s = _sched()
    s.add(_req("a", 6, max_tokens=3))
    for _ in range(3):
        _advance(s)
    assert not s.has_unfinished()
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_eos_stops_unless_ignored() -> None:
    s = _sched()
    s.add(_req("a", 3))
    out = s.schedule()
    outputs = s.update(out, {"a": 999})
    assert outputs[0].finish_reason is FinishReason.STOP


def test_newest_request_is_preempted_when_blocks_run_out() -> None:
    s = _sched(num_blocks=6, budget=64)
    s.add(_req("a", 8, max_tokens=20))
    s.add(_req("b", 8, max_tokens=20))
    _advance(s)  # both prefilled: 2 + 2 blocks (+1 slot each soon)
    for _ in range(6):
        _advance(s)
    assert s.num_preemptions >= 1
    assert s.requests["b"].num_preemptions >= 1
    assert s.requests["a"].num_preemptions == 0


def test_abort_frees_blocks_and_reports_abort() -> None:
    s = _sched()
    s.add(_req("a", 10))
    _advance(s)
    out = s.abort("a")
    assert out is not None and out.finish_reason is FinishReason.ABORT
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert s.abort("a") is None


def test_imported_request_goes_on_from_its_kv() -> None:
    s = _sched()
    req = _req("a", 20, max_tokens=8)
    req.output_token_ids = [1, 2, 3]
    # KV of every token but the last arrived from another replica.
    assert s.kv.allocate_slots(req, 22)
    req.num_computed_tokens = 22
    s.add(req)
    out = s.schedule()
    assert out.decodes == [req] and not out.prefills
    s.update(out, {"a": 7})
    assert req.output_token_ids == [1, 2, 3, 7] and req.num_computed_tokens == 23


def test_removed_request_keeps_its_blocks() -> None:
    s = _sched()
    s.add(_req("a", 10))
    _advance(s)
    free = s.kv.num_free_blocks
    req = s.remove("a")
    assert req is not None and not s.has_unfinished()
    assert s.kv.num_free_blocks == free and s.kv.block_table("a")
    assert s.remove("a") is None
