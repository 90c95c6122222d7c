"""Batched sampling: greedy, temperature, top-k, top-p.

Random draws use a counter-based stream: the noise for a request's n-th output
token comes from a generator seeded by (request seed, n) alone, so a seeded
request samples the same tokens whatever else shares its batch, and wherever
it runs.
"""

from __future__ import annotations

import torch

from serve.engine.request import SamplingParams

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def counter_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step) (splitmix64 finaliser)."""
    z = (seed * _MIX + step + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK


def sample(
    logits: torch.Tensor,  # [n, vocab] float32
    params: list[SamplingParams],
    seeds: list[int],
    steps: list[int],
) -> list[int]:
    """One token id per row."""
    tokens = logits.argmax(dim=-1)  # [n]
    rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if rows:
        idx = torch.tensor(rows)
        sub = logits[idx]  # [r, vocab]
        temp = torch.tensor([params[i].temperature for i in rows], dtype=sub.dtype)
        probs = apply_top_k_top_p(
            sub / temp[:, None],
            [params[i].top_k for i in rows],
            [params[i].top_p for i in rows],
        ).softmax(dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            gen = torch.Generator().manual_seed(counter_seed(seeds[i], steps[i]))
            noise[j].exponential_(generator=gen)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
        tokens[idx] = (probs / noise).argmax(dim=-1)
    return tokens.tolist()


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Masks logits outside each row's top-k and top-p nucleus with -inf."""
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k])[:, None]
    drop = ranks >= k
    p = torch.tensor(top_p, dtype=logits.dtype)[:, None]
    cum = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1).cumsum(dim=-1)
    # Keep the smallest prefix whose mass reaches p (the top token always stays).
    drop |= (cum - cum.diff(dim=-1, prepend=torch.zeros_like(cum[:, :1]))) >= p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
