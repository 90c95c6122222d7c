"""Which replica probably holds a prompt's prefix in its KV cache.

A request without a session_id still often continues an earlier one: a dialogue
whose client resends the whole conversation, a translation whose template and
glossary repeat. The gateway cannot see the replicas' caches, so it remembers
what it sent where: for each replica, the chained hashes of the block-aligned
prefixes of the prompts (and answers) it served recently. A new prompt's cached
prefix on a replica is estimated as the longest run of its leading blocks that
replica has seen.

The index is a hint. A replica evicts blocks the index still lists (the router
only loses some reuse), and it forgets a replica that comes back after being
unreachable (it may have restarted with an empty cache).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class PrefixIndex:
    """Block hashes of recent prompts, each with the replicas that saw it."""

    def __init__(self, block_tokens: int = 16, max_blocks: int = 1 << 18) -> None:
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        # Chained block hash -> addresses of the replicas that hold that prefix.
        self._blocks: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """One hash per whole block; each covers every token before it too."""
        size = self.block_tokens
        hashes: list[int] = []
        running = 0
        for start in range(0, len(token_ids) - size + 1, size):
            running = hash((running, tuple(token_ids[start : start + size])))
            hashes.append(running)
        return hashes

    def record(self, address: str, token_ids: Sequence[int]) -> None:
        """`address` now holds the KV of `token_ids` (its whole blocks)."""
        blocks = self._blocks
        for h in self.block_hashes(token_ids):
            owners = blocks.get(h)
            if owners is None:
                blocks[h] = {address}
            else:
                owners.add(address)
                blocks.move_to_end(h)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def cached_tokens(self, token_ids: Sequence[int]) -> dict[str, int]:
        """Per replica that holds any of it, the length of the prompt's longest
        cached prefix (a multiple of block_tokens)."""
        found: dict[str, int] = {}
        alive: set[str] | None = None
        hashes = self.block_hashes(token_ids)
        for i, h in enumerate(hashes):
            owners = self._blocks.get(h, set())
            still = set(owners) if alive is None else alive & owners
            for address in (alive or set()) - still:
                found[address] = i * self.block_tokens
            alive = still
            if not alive:
                return found
        for address in alive or ():
            found[address] = len(hashes) * self.block_tokens
        return found

    def forget(self, address: str) -> None:
        """Drops everything listed for `address` (its cache is gone)."""
        emptied = []
        for h, owners in self._blocks.items():
            owners.discard(address)
            if not owners:
                emptied.append(h)
        for h in emptied:
            del self._blocks[h]
