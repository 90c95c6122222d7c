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
        # Chained block hash -> bit mask of the replicas that hold that prefix (an int
        # per block: about 100 bytes an entry, 26 MB at 2^18 blocks).
        self._blocks: OrderedDict[int, int] = OrderedDict()
        self._bits: dict[str, int] = {}

    def _bit(self, address: str) -> int:
        bit = self._bits.get(address)
        if bit is None:
            bit = self._bits[address] = 1 << len(self._bits)
        return bit

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
        bit = self._bit(address)
        for h in self.block_hashes(token_ids):
            owners = blocks.get(h)
            if owners is None:
                blocks[h] = bit
            else:
                blocks[h] = owners | bit
                blocks.move_to_end(h)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def cached_tokens(self, token_ids: Sequence[int]) -> dict[str, int]:
        """Per replica that holds any of it, the length of the prompt's longest
        cached prefix (a multiple of block_tokens)."""
        found: dict[str, int] = {}
        alive = -1  # every replica, until the first block
        hashes = self.block_hashes(token_ids)
        matched = 0
        for i, h in enumerate(hashes):
            still = alive & self._blocks.get(h, 0)
            if i and still != alive:
                self._found(alive & ~still, i, found)
            alive = still
            if not alive:
                return found
            matched = i + 1
        if matched:
            self._found(alive, matched, found)
        return found

    def _found(self, mask: int, num_blocks: int, found: dict[str, int]) -> None:
        for address, bit in self._bits.items():
            if mask & bit:
                found[address] = num_blocks * self.block_tokens

    def forget(self, address: str) -> None:
        """Drops everything listed for `address` (its cache is gone)."""
        bit = self._bits.get(address)
        if bit is None:
            return
        emptied = []
        for h, owners in self._blocks.items():
            owners &= ~bit
            if owners:
                self._blocks[h] = owners
            else:
                emptied.append(h)
        for h in emptied:
            del self._blocks[h]
