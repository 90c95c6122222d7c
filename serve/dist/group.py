"""The tensor-parallel group a model's layers communicate through.

A group of size 1 is the single-process path: every collective is the identity,
so one device runs exactly the code that N ranks run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    size: int = 1
    # None: the default torch.distributed group (only used when size > 1).
    pg: object | None = None

    @classmethod
    def single(cls) -> ParallelGroup:
        return cls()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks (in place when size > 1)."""
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.pg)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's x along dim."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.pg)
        return torch.cat(parts, dim=dim)

    def shard(self, n: int, what: str) -> int:
        """The per-rank share of n items, which must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the TP size ({self.size})")
        return n // self.size
