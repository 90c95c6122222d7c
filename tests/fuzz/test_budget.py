"""The fuzz budget: what `make test` gives the fuzzers adds up to at least 60 s."""

import math

from tests.fuzz.budget import DEFAULT_TOTAL_S, SHARES


def test_shares_cover_the_whole_budget() -> None:
    """Pass: the shares of the fuzz tests add up to 1 and the default total is at
    least 60 s (each test runs until its share is spent)."""
    assert math.isclose(sum(SHARES.values()), 1.0)
    assert DEFAULT_TOTAL_S >= 60.0
