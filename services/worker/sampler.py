"""Turns one row of logits per job into one token per job.

Greedy rows take the argmax. Other rows are divided by their temperature, cut to the top-k, cut
to the nucleus (top-p: the smallest prefix of the sorted distribution whose probability reaches
top_p, never empty), renormalised, and sampled by inverse CDF: one uniform number per row,
located in the row's cumulative distribution with a single vectorised searchsorted.

Drawing the uniform numbers ourselves (instead of calling torch.multinomial per row) is what
makes seeded sampling cheap and reproducible: a seeded row's number comes from a CPU generator
seeded from (seed, position) alone, so it does not depend on which other jobs share the batch,
on the device, or on whether the job is recomputed after preemption.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.batch import Sampling

_MASK_64 = (1 << 64) - 1
_GOLDEN_64 = 0x9E3779B97F4A7C15  # odd constant, spreads seeds apart before adding the position


def row_seed(seed: int, position: int) -> int:
    """The generator seed for the token at `position` of a job sampled with `seed`."""
    return (seed * _GOLDEN_64 + position) & _MASK_64


def sample(logits: torch.Tensor, params: Sequence[Sampling], positions: Sequence[int]) -> list[int]:
    """One token per row of `logits` [B, V].

    `positions[i]` is the position the sampled token will take in its job (prompt + output so
    far), which keys the generator of seeded rows.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ValueError(
            f"need logits [B, V] with B = len(params) = len(positions); got "
            f"{tuple(logits.shape)}, {len(params)}, {len(positions)}"
        )
    tokens = [0] * len(params)
    greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
    random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if greedy_rows:
        chosen = logits[greedy_rows].argmax(dim=-1).tolist()
        for row, token in zip(greedy_rows, chosen, strict=True):
            tokens[row] = token
    if random_rows:
        chosen = _sample_random(
            logits[random_rows].float(),
            [params[i] for i in random_rows],
            [positions[i] for i in random_rows],
        )
        for row, token in zip(random_rows, chosen, strict=True):
            tokens[row] = token
    return tokens


def _sample_random(
    logits: torch.Tensor, params: Sequence[Sampling], positions: Sequence[int]
) -> list[int]:
    device = logits.device
    num_rows, vocab_size = logits.shape
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    # top_k = 0 (disabled) keeps the whole vocabulary.
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)

    sorted_logits, sorted_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    ranks = torch.arange(vocab_size, device=device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token while the mass before it is short of top_p; rank 0 always stays.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep = (mass_before < top_p[:, None]) & (ranks[None, :] < top_k[:, None])
    keep[:, 0] = True
    cdf = torch.cumsum((probs * keep).double(), dim=-1)

    uniform = _uniforms(params, positions).to(device)
    targets = uniform[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, targets, right=True)
    # Rounding can put a target at the very top of the CDF; stay inside the kept prefix.
    num_kept = keep.sum(dim=-1, keepdim=True)
    picked = torch.minimum(picked, num_kept - 1)
    assert picked.shape == (num_rows, 1)
    return sorted_ids.gather(1, picked).squeeze(1).tolist()


def _uniforms(params: Sequence[Sampling], positions: Sequence[int]) -> torch.Tensor:
    """One number in [0, 1) per row, float64 so the CDF lookup is not coarsened."""
    values = torch.rand(len(params), dtype=torch.float64)  # unseeded rows: global RNG
    generator = torch.Generator()
    for row, (param, position) in enumerate(zip(params, positions, strict=True)):
        if param.seed is not None:
            generator.manual_seed(row_seed(param.seed, position))
            values[row] = torch.rand(1, generator=generator, dtype=torch.float64)
    return values
