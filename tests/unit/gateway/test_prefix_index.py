"""serve.gateway.prefix_index: which replica probably holds a prompt's prefix."""

from __future__ import annotations

import pytest

from serve.config import PrefixAffinityConfig
from serve.gateway.prefix_index import PrefixIndex


def test_the_longest_cached_prefix_is_found_per_replica() -> None:
    index = PrefixIndex(block_tokens=4)
    dialogue = list(range(40))
    index.record("a", dialogue[:18])  # four whole blocks; the last two tokens are not one
    index.record("b", dialogue[:8])
    index.record("c", [99, *dialogue[1:12]])  # differs in the first token
    assert index.cached_tokens(dialogue) == {"a": 16, "b": 8}
    assert index.cached_tokens(dialogue[:10]) == {"a": 8, "b": 8}
    assert index.cached_tokens(dialogue[:3]) == {}  # not one whole block
    assert index.cached_tokens([7] * 12) == {}


def test_a_block_counts_only_after_the_same_tokens() -> None:
    index = PrefixIndex(block_tokens=2)
    index.record("a", [1, 2, 3, 4])
    # The second block's tokens match, the first block's do not.
    assert index.cached_tokens([9, 9, 3, 4]) == {}
    assert index.cached_tokens([1, 2, 3, 5]) == {"a": 2}


def test_least_recently_used_blocks_are_forgotten_first() -> None:
    index = PrefixIndex(block_tokens=2, max_blocks=4)
    index.record("a", [1, 1, 2, 2])
    index.record("b", [5, 5, 6, 6])
    index.record("a", [1, 1, 2, 2])  # used again: the b prompt is older now
    index.record("c", [8, 8, 9, 9])
    assert len(index) == 4
    assert index.cached_tokens([1, 1, 2, 2]) == {"a": 4}
    assert index.cached_tokens([5, 5, 6, 6]) == {}
    assert index.cached_tokens([8, 8, 9, 9]) == {"c": 4}
    # A prefix whose first block was forgotten is gone, whatever follows it.
    index.record("a", [3, 3])
    index.record("a", [1, 1, 2, 2])
    assert index.cached_tokens([8, 8, 9, 9]) == {}


def test_forgetting_a_replica_keeps_the_others() -> None:
    index = PrefixIndex(block_tokens=2)
    index.record("a", [1, 2, 3, 4])
    index.record("b", [1, 2])
    index.forget("a")
    assert index.cached_tokens([1, 2, 3, 4]) == {"b": 2}
    assert len(index) == 1


@pytest.mark.parametrize("options", [{"block_tokens": 0}, {"max_blocks": 0}, {"load_slack": -0.1}])
def test_bad_settings_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrefixAffinityConfig(**options)  # type: ignore[arg-type]
