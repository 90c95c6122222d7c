"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-request block
tables, and a prefix cache of full blocks keyed by a hash chain.

A full block's key hashes its tokens together with the key of the block before
it, so equal keys mean equal prefixes. Freed blocks keep their contents and key
until they are reused (least recently freed first), so a dialogue's next turn
finds the previous turn's KV even after that request finished.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from serve.engine.request import Request

logger = logging.getLogger(__name__)


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """Key of a full block: blake2b of the parent key and the block's token ids."""
    return hashlib.blake2b(parent + array("I", tokens).tobytes(), digest_size=16).digest()


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    key: bytes | None = None


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; cached ones keep their key.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.req_blocks: dict[str, list[int]] = {}
        self.req_keys: dict[str, list[bytes]] = {}
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def find_cached_prefix(self, request: Request) -> tuple[list[int], list[bytes]]:
        """Blocks holding the longest cached prefix of the request's tokens.

        At least one token is always left to compute, so the step that finishes
        the prompt has logits to sample from."""
        if not self.enable_prefix_caching:
            return [], []
        num_full = (request.num_tokens - 1) // self.block_size
        blocks, keys = self.match_prefix(request.tokens(0, num_full * self.block_size))
        self.num_query_tokens += request.num_tokens
        self.num_hit_tokens += len(blocks) * self.block_size
        return blocks, keys

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding the longest prefix of token_ids made of full blocks
        (no statistics counted; nothing is held)."""
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        blocks: list[int] = []
        keys: list[bytes] = []
        parent = b""
        for i in range(len(token_ids) // bs):
            key = block_hash(parent, token_ids[i * bs : (i + 1) * bs])
            block_id = self.cached.get(key)
            if block_id is None:
                break
            blocks.append(block_id)
            keys.append(key)
            parent = key
        return blocks, keys

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        cached_blocks: list[int] | None = None,
        cached_keys: list[bytes] | None = None,
    ) -> bool:
        """Makes room for num_new_tokens more tokens; False (nothing changed)
        when the pool is too small. cached_blocks come from find_cached_prefix
        and are taken into the request's table first."""
        cached_blocks = cached_blocks or []
        table = self.req_blocks.setdefault(request.request_id, [])
        total = len(table) + len(cached_blocks)
        num_tokens = request.num_computed_tokens + len(cached_blocks) * self.block_size
        need = -(-(num_tokens + num_new_tokens) // self.block_size) - total
        reviving = sum(1 for b in cached_blocks if self.blocks[b].ref_cnt == 0)
        if max(need, 0) + reviving > self.num_free_blocks:
            if not table:
                del self.req_blocks[request.request_id]
            return False
        for b in cached_blocks:
            block = self.blocks[b]
            if block.ref_cnt == 0:
                del self.free_queue[b]
            block.ref_cnt += 1
        table.extend(cached_blocks)
        if cached_keys:
            self.req_keys[request.request_id] = list(cached_keys)
        for _ in range(max(need, 0)):
            table.append(self._pop_free())
        return True

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.key is not None:
            if self.cached.get(block.key) == block_id:
                del self.cached[block.key]
            block.key = None
        block.ref_cnt = 1
        return block_id

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's newly completed blocks in the prefix cache (not
        when its KV came through a lossy codec)."""
        if not self.enable_prefix_caching or not request.kv_exact:
            return
        keys = self.req_keys.setdefault(request.request_id, [])
        table = self.req_blocks.get(request.request_id, [])
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(table))
        parent = keys[-1] if keys else b""
        for i in range(len(keys), num_full):
            key = block_hash(parent, request.tokens(i * bs, (i + 1) * bs))
            keys.append(key)
            parent = key
            if key not in self.cached:
                self.cached[key] = table[i]
                self.blocks[table[i]].key = key

    def free(self, request: Request) -> None:
        """Returns the request's blocks; the last blocks are reused first."""
        table = self.req_blocks.pop(request.request_id, [])
        self.req_keys.pop(request.request_id, None)
        self.release(table)

    def acquire(self, block_ids: list[int]) -> None:
        """Holds blocks besides their owner (while their KV is read for a move): they
        are not reused until released, even if the owner frees them."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_queue[block_id]
            block.ref_cnt += 1

    def release(self, block_ids: list[int]) -> None:
        """Drops one reference to each block; the last ones listed are reused first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                # Uncached blocks go to the front: they are worthless once freed.
                self.free_queue[block_id] = None
                if block.key is None:
                    self.free_queue.move_to_end(block_id, last=False)
