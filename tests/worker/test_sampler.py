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


def frequencies(sampling: SamplingParams, num_draws: int = 16000) -> list[float]:
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
    # 16000 draws: the standard error of a frequency is at most 0.004.
    assert observed == pytest.approx(list(expected), abs=0.02)


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


# The vectorised step: mixed batches, the counter-based noise, and no Python per row.


def mixed_params(num_rows: int) -> list[SamplingParams]:
    """Every kind of row, cycling: greedy, unseeded, seeded, seeded with top-k / top-p."""
    kinds = [
        lambda i: SamplingParams(),
        lambda i: SamplingParams(temperature=0.9),
        lambda i: SamplingParams(temperature=1.3, seed=i),
        lambda i: SamplingParams(temperature=0.7, top_k=5, seed=1000 + i),
        lambda i: SamplingParams(temperature=1.0, top_p=0.5, seed=2000 + i, logprobs=True),
        lambda i: SamplingParams(temperature=2.0, top_k=20, top_p=0.9, seed=2**64 - 1 - i),
    ]
    return [kinds[i % len(kinds)](i) for i in range(num_rows)]


def allowed(logits_row: torch.Tensor, sampling: SamplingParams) -> set[int]:
    """Tokens top-k then top-p keep, computed the slow way, one row in float64."""
    probs = torch.softmax(logits_row.double() / sampling.temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    if sampling.top_k:
        order = order[: sampling.top_k]
    kept_mass = probs[order].sum()
    keep, mass = [], 0.0
    for token in order:
        if mass >= sampling.top_p * kept_mass:
            break
        keep.append(token)
        mass += float(probs[token])
    return set(keep)


def test_noise_bits_are_the_python_reference_on_any_key():
    from services.worker.sampler import _signed, noise_bits, reference_noise_bits, row_seed

    keys = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, row_seed(2**64 - 1, 10**6), row_seed(42, 17)]
    bits = noise_bits(torch.tensor([_signed(k) for k in keys]), 300)
    for row, key in enumerate(keys):
        for index in (0, 1, 2, 150, 299):
            assert int(bits[row, index]) & (2**64 - 1) == reference_noise_bits(key, index)


def test_exponential_noise_has_unit_mean_and_variance():
    from services.worker.sampler import exponentials

    noise = exponentials(torch.arange(200), 5000).double()
    assert noise.min() > 0
    assert float(noise.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(noise.var()) == pytest.approx(1.0, abs=0.02)


def test_greedy_rows_of_a_mixed_batch_are_the_argmax():
    logits = random_logits(num_rows=48, vocab_size=300)
    params = mixed_params(48)
    tokens = sample(logits, params, list(range(48)))
    argmax = logits.argmax(-1).tolist()
    for row, sampling in enumerate(params):
        if sampling.is_greedy:
            assert tokens[row] == argmax[row]


def test_mixed_batches_respect_each_rows_top_k_and_top_p():
    num_rows = 60
    logits = random_logits(num_rows=num_rows, vocab_size=200, seed=3)
    params = mixed_params(num_rows)
    reached: dict[int, set[int]] = {row: set() for row in range(num_rows)}
    for position in range(40):
        tokens = sample(logits, params, [position] * num_rows)
        for row, token in enumerate(tokens):
            reached[row].add(token)
    for row, sampling in enumerate(params):
        if sampling.is_greedy or not (sampling.top_k or sampling.top_p < 1):
            continue
        keep = allowed(logits[row], sampling)
        assert reached[row] <= keep, (row, sampling)
    # top_k=5 at temperature 0.7 over 40 draws reaches more than one token: it samples.
    assert max(len(reached[row]) for row in range(3, num_rows, 6)) > 1


def test_a_seeded_row_draws_the_same_token_in_any_batch_and_order():
    num_rows = 30
    logits = random_logits(num_rows=num_rows, vocab_size=500, seed=5)
    params = mixed_params(num_rows)
    positions = [11 * row for row in range(num_rows)]
    alone = [
        sample(logits[row : row + 1], [params[row]], [positions[row]])[0] for row in range(num_rows)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(num_rows, generator=generator)[:20].tolist()
        tokens = sample(logits[order], [params[r] for r in order], [positions[r] for r in order])
        for token, row in zip(tokens, order, strict=True):
            if params[row].seed is not None or params[row].is_greedy:
                assert token == alone[row], (row, params[row])


def test_draws_over_many_seeds_follow_softmax_over_temperature():
    """Chi-square over 20,000 seeds (fixed, so the test is deterministic)."""
    vocab_size, temperature, num_draws = 12, 0.7, 20000
    row = torch.randn(vocab_size, generator=torch.Generator().manual_seed(1))
    logits = row.repeat(num_draws, 1)
    params = [SamplingParams(temperature=temperature, seed=seed) for seed in range(num_draws)]
    tokens = sample(logits, params, [9] * num_draws)
    expected = torch.softmax(row.double() / temperature, dim=-1) * num_draws
    observed = torch.bincount(torch.tensor(tokens), minlength=vocab_size).double()
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 32.9  # the 0.9995 quantile of chi-square with 11 degrees of freedom


class _OpCounter:
    """Counts the ATen ops a block of code runs, and its tolist / item calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.ops = 0
        self.host_copies = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                counter.ops += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                counter.host_copies += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_the_step_has_no_python_per_row(monkeypatch):
    """The same number of tensor ops for 6 rows as for 96, and one host copy of the ids."""
    from services.worker.sampler import logprobs

    counts = []
    for num_rows in (6, 96):
        logits = random_logits(num_rows=num_rows, vocab_size=100)
        params = mixed_params(num_rows)
        counter = _OpCounter(monkeypatch)
        with counter.mode:
            tokens = sample(logits, params, list(range(num_rows)))
        assert counter.host_copies == 1
        step_ops = counter.ops
        counter.host_copies = 0
        with counter.mode:
            logprobs(logits, tokens, params)
        assert counter.host_copies == 1
        counts.append((step_ops, counter.ops))
        monkeypatch.undo()
    assert counts[0] == counts[1]


def test_top_p_keeps_the_same_tokens_whether_or_not_the_nucleus_fits_the_probe(monkeypatch):
    """On CPU, top-p alone looks for the nucleus among the NUCLEUS_PROBE most likely tokens
    and sorts the whole vocabulary only for rows whose nucleus is wider: the masks must be
    those of a whole sort, for peaked rows, flat rows and rows with a top-k, in one batch."""
    from services.worker import sampler

    vocab = 3000
    generator = torch.Generator().manual_seed(7)
    peaked = torch.randn(8, vocab, generator=generator) * 6  # nucleus within a few tokens
    flat = torch.randn(8, vocab, generator=generator) * 0.1  # nucleus of thousands
    probs = torch.softmax(torch.cat([peaked, flat]), dim=-1)
    top_p = torch.tensor([0.9, 0.5, 0.99, 1.0] * 4)
    top_k = torch.tensor([vocab] * 12 + [40, vocab, 600, vocab])
    monkeypatch.setattr(sampler, "NUCLEUS_PROBE", 256)
    fast = sampler._keep_mask(probs, top_k, top_p, vocab)
    head = torch.topk(probs, 256, dim=-1).values.sum(-1)
    assert (head[:8] >= 0.9).any() and (head[8:] < 0.5).all()  # both paths were taken
    monkeypatch.setattr(sampler, "NUCLEUS_PROBE", vocab)  # the whole sort for every row
    whole = sampler._keep_mask(probs, top_k, top_p, vocab)
    assert torch.equal(fast, whole)
    assert (fast.sum(-1)[8:12] > 256).all()  # flat rows kept more than the probe holds


def test_the_race_among_survivors_is_the_whole_vocabularys_race(monkeypatch):
    """Rows that filter race among their survivors only, drawing noise for those tokens alone:
    the winner must be the whole-vocabulary race's with the other tokens zeroed, on both the
    probe and the whole-sort paths."""
    from services.worker import sampler

    vocab = 3000
    generator = torch.Generator().manual_seed(11)
    logits = torch.cat(
        [
            torch.randn(12, vocab, generator=generator) * 6,
            torch.randn(12, vocab, generator=generator),
        ]
    )
    probs = torch.softmax(logits, dim=-1)
    top_k = torch.tensor([vocab, 5, 700, vocab] * 6)
    top_p = torch.tensor([0.9, 1.0, 0.8, 0.5, 0.95, 0.3] * 4)
    keys = torch.randint(-(2**62), 2**62, (24,), generator=generator)
    monkeypatch.setattr(sampler, "NUCLEUS_PROBE", 256)
    for max_top_k in (vocab, 700):
        rows = slice(None) if max_top_k == vocab else top_k <= 700
        kept = sampler._keep_mask(probs[rows], top_k[rows], top_p[rows], max_top_k)
        noise = sampler.exponentials(keys[rows], vocab).clamp_min_(1e-20)
        whole = (probs[rows] * kept / noise).argmax(dim=-1)
        raced = sampler._filtered_race(probs[rows], top_k[rows], top_p[rows], max_top_k, keys[rows])
        assert torch.equal(raced, whole)
