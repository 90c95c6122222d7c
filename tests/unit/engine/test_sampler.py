import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.engine.request import SamplingParams
from serve.engine.sampler import apply_top_k_top_p, counter_seed, sample


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy, greedy], [1, 2], [0, 0]) == [1, 0]


def test_seeded_sampling_ignores_the_rest_of_the_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen)
    sp = SamplingParams(temperature=1.0, top_p=0.95)
    batch = sample(logits, [sp] * 5, [11, 12, 13, 14, 15], [3, 3, 3, 3, 3])
    alone = sample(logits[2:3], [sp], [13], [3])
    assert batch[2] == alone[0]


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log()[None, :]
    sp = SamplingParams(temperature=1.0)
    counts = torch.zeros(3)
    for step in range(3000):
        counts[sample(logits, [sp], [5], [step])[0]] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, probs, atol=0.03)


def test_top_k_keeps_only_k_tokens() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k_top_p(logits, [2], [1.0])
    assert torch.isinf(out[0, [0, 3]]).all()
    assert torch.isfinite(out[0, [1, 2]]).all()


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_k_top_p(probs.log(), [0], [0.75])
    assert torch.isfinite(out[0, :2]).all()
    assert torch.isinf(out[0, 2:]).all()


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0, 2**62),
    st.integers(0, 10_000),
    st.floats(0.05, 1.0),
    st.integers(0, 20),
)
def test_sampled_token_is_always_allowed(seed: int, step: int, top_p: float, top_k: int) -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(seed % 1000))
    allowed = torch.isfinite(apply_top_k_top_p(logits, [top_k], [top_p]))[0]
    sp = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k)
    token = sample(logits, [sp], [seed], [step])[0]
    assert allowed[token]


def test_counter_seed_differs_by_step_and_seed() -> None:
    seeds = {counter_seed(s, k) for s in range(20) for k in range(20)}
    assert len(seeds) == 400
    assert all(0 <= x < 2**63 for x in seeds)
