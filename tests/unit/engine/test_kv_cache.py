from serve.engine.kv_cache import KVCacheManager, block_hash
from serve.engine.request import Request, SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_allocate_and_free_return_every_block() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = _req("a", list(range(10)))
    assert kv.allocate_slots(r, 10)
    assert len(kv.block_table("a")) == 3
    assert kv.num_free_blocks == 5
    kv.free(r)
    assert kv.num_free_blocks == 8
    assert kv.block_table("a") == []


def test_allocation_fails_without_side_effects_when_pool_is_short() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = _req("a", list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert kv.num_free_blocks == 2
    assert "a" not in kv.req_blocks


def test_prefix_cache_hit_after_the_first_request_finished() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", list(range(10)))
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_full_blocks(a)
    first_blocks = kv.block_table("a")[:2]
    kv.free(a)
    b = _req("b", list(range(10)) + [99, 98])
    blocks, keys = kv.find_cached_prefix(b)
    assert blocks == first_blocks  # two full blocks of 4 tokens are shared
    assert kv.num_hit_tokens == 8
    assert kv.allocate_slots(b, 4, blocks, keys)
    assert kv.block_table("b")[:2] == first_blocks
    assert kv.blocks[first_blocks[0]].ref_cnt == 1


def test_prefix_is_not_matched_when_an_earlier_block_differs() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", list(range(12)))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    changed = list(range(12))
    changed[1] = 77  # first block differs, second and third equal
    blocks, _ = kv.find_cached_prefix(_req("b", changed + [1]))
    assert blocks == []


def test_at_least_one_token_is_left_to_compute() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    blocks, _ = kv.find_cached_prefix(_req("b", list(range(8))))
    assert len(blocks) == 1  # the second block holds the last token, recomputed


def test_shared_blocks_are_reused_and_evicted_only_when_free() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = _req("a", [1, 2, 3, 4, 5])
    kv.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    kv.cache_full_blocks(a)
    b = _req("b", [1, 2, 3, 4, 9])
    blocks, keys = kv.find_cached_prefix(b)
    assert kv.allocate_slots(b, 1, blocks, keys)
    assert kv.blocks[blocks[0]].ref_cnt == 2
    kv.free(a)
    assert kv.blocks[blocks[0]].ref_cnt == 1
    kv.free(b)
    assert kv.num_free_blocks == 4
    # Cached blocks survive until the pool needs them.
    assert len(kv.cached) == 2
    c = _req("c", list(range(100, 108)))
    assert kv.allocate_slots(c, 8)
    assert kv.cached == {}


def test_block_hash_chains_the_parent() -> None:
    assert block_hash(b"", [1, 2]) != block_hash(block_hash(b"", [0, 0]), [1, 2])
    assert block_hash(b"", [1, 2]) == block_hash(b"", [1, 2])


def test_held_blocks_outlive_their_owner() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = _req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    held = list(kv.block_table("a"))
    kv.acquire(held)
    kv.free(a)
    assert kv.num_free_blocks == 2  # still held by the move
    b = _req("b", list(range(100, 116)))
    assert not kv.allocate_slots(b, 16)  # cannot take the held ones
    kv.release(held)
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots(b, 16)


def test_match_prefix_neither_counts_nor_holds() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    blocks, keys = kv.match_prefix(list(range(12)))
    assert blocks == kv.block_table("a")[:2] and len(keys) == 2
    assert kv.num_query_tokens == 0 and kv.num_hit_tokens == 0
    kv.free(a)
    assert kv.num_free_blocks == 8


def test_lossy_kv_stays_out_of_the_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(9)))
    a.kv_exact = False
    assert kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_full_blocks(a)
    assert kv.match_prefix(list(range(9))) == ([], [])
