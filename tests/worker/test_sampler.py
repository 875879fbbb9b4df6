"""The sampler on hand-made logits: greedy picks, filters, seeding and the drawn distribution."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.sampling import SamplingParams
from services.worker.sampler import sample

# Probabilities of a 4-token vocabulary, far enough apart for frequency checks.
PROBS = (0.5, 0.3, 0.15, 0.05)


def random_logits(num_rows: int = 6, vocab_size: int = 1000, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * 3


def frequencies(sampling: SamplingParams, num_draws: int = 4000) -> list[float]:
    """Draws num_draws tokens from PROBS, one seeded row per position."""
    logits = torch.tensor([math.log(p) for p in PROBS]).repeat(num_draws, 1)
    tokens = sample(logits, [sampling] * num_draws, list(range(num_draws)))
    return [tokens.count(t) / num_draws for t in range(len(PROBS))]


def test_greedy_is_argmax_also_in_bfloat16():
    logits = random_logits()
    params = [SamplingParams()] * len(logits)
    assert sample(logits, params, [0] * len(logits)) == logits.argmax(-1).tolist()
    low = logits.bfloat16()
    assert sample(low, params, [0] * len(logits)) == low.float().argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0])
def test_top_k_one_is_greedy_at_any_temperature(temperature):
    logits = random_logits()
    params = [SamplingParams(temperature=temperature, top_k=1)] * len(logits)
    assert sample(logits, params, list(range(len(logits)))) == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token():
    logits = random_logits(num_rows=50, vocab_size=20)
    params = [SamplingParams(temperature=2.0, top_p=1e-6, seed=i) for i in range(50)]
    assert sample(logits, params, [7] * 50) == logits.argmax(-1).tolist()


def test_seeded_rows_ignore_the_rest_of_the_batch():
    logits = random_logits(num_rows=4)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[2:3], [seeded], [17])
    assert sample(logits[2:3], [seeded], [17]) == alone
    # Same row and position in a batch with greedy, unseeded and other-seed rows, reordered.
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        seeded,
        SamplingParams(temperature=1.0, seed=7),
    ]
    batch = torch.stack([logits[0], logits[1], logits[2], logits[3]])
    assert sample(batch, params, [3, 9, 17, 17])[2] == alone[0]
    reordered = torch.stack([logits[2], logits[0]])
    assert sample(reordered, [seeded, SamplingParams()], [17, 5])[0] == alone[0]


def test_seed_and_position_both_change_the_draw():
    logits = torch.zeros(1, 1000)  # uniform: every draw is pure noise
    flat = SamplingParams(temperature=1.0, seed=1)
    by_position = {sample(logits, [flat], [p])[0] for p in range(20)}
    by_seed = {sample(logits, [SamplingParams(temperature=1.0, seed=s)], [0])[0] for s in range(20)}
    assert len(by_position) > 15 and len(by_seed) > 15


def test_unseeded_rows_are_random():
    logits = torch.zeros(200, 1000)
    tokens = sample(logits, [SamplingParams(temperature=1.0)] * 200, [0] * 200)
    assert len(set(tokens)) > 150


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (SamplingParams(temperature=1.0, seed=0), PROBS),
        # Temperature 2 flattens p to p ** 0.5, renormalised.
        (
            SamplingParams(temperature=2.0, seed=1),
            tuple(p**0.5 / sum(q**0.5 for q in PROBS) for p in PROBS),
        ),
        # top_k=2 and top_p=0.75 both keep {0.5, 0.3}, renormalised to 0.625 / 0.375.
        (SamplingParams(temperature=1.0, top_k=2, seed=2), (0.625, 0.375, 0.0, 0.0)),
        (SamplingParams(temperature=1.0, top_p=0.75, seed=3), (0.625, 0.375, 0.0, 0.0)),
        # top_k=3 renormalises to {0.526, 0.316, 0.158}, so top_p=0.82 keeps only the first
        # two (without renormalising it would keep three).
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.82, seed=4), (0.625, 0.375, 0.0, 0.0)),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "top_k+top_p"],
)
def test_distribution_matches(sampling, expected):
    assert sum(expected) == pytest.approx(1.0, abs=1e-3)
    observed = frequencies(sampling)
    # 4000 draws: the standard error of a frequency is at most 0.008.
    assert observed == pytest.approx(list(expected), abs=0.03)


def test_rejects_bad_params_and_shapes():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [SamplingParams()], [0])


def test_logprobs_are_the_raw_log_softmax_with_sorted_alternatives():
    from services.worker.sampler import logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    params = [
        SamplingParams(logprobs=True, top_logprobs=4),
        SamplingParams(),  # did not ask
        SamplingParams(
            temperature=0.7, logprobs=True
        ),  # the raw distribution, not the tempered one
    ]
    tokens = [int(logits[0].argmax()), 5, 7]
    result = logprobs(logits, tokens, params)
    reference = torch.log_softmax(logits, dim=-1)
    assert result[1] is None
    assert result[0].logprob == pytest.approx(float(reference[0, tokens[0]]), abs=1e-6)
    assert [t for t, _ in result[0].top] == reference[0].topk(4).indices.tolist()
    assert result[0].top[0] == (tokens[0], pytest.approx(result[0].logprob))
    assert result[2].logprob == pytest.approx(float(reference[2, 7]), abs=1e-6)
    assert result[2].top == ()
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(logprobs=True, top_logprobs=21)
