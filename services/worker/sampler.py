"""Turns one row of logits per job into one token per job.

Greedy rows take the argmax. Other rows are divided by their temperature, cut to the top-k, cut
to the nucleus (top-p: the smallest prefix of the sorted distribution whose probability reaches
top_p, never empty), and sampled with the exponential race: token = argmax(p_i / E_i) with
E_i ~ Exp(1) drawn per token, which picks i with probability p_i (as vLLM does).

We use the race rather than inverse-CDF or torch.multinomial because it is stable: a seeded
row's noise depends only on (seed, position), and a tiny change of the logits (another batch
composition sums in another order) changes the pick only if two tokens nearly tie for the
maximum. Inverse-CDF over a flat 50k-token distribution flips tokens on 1e-6 perturbations,
which would break "re-batching or recomputation samples the same token".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.sampling import SamplingParams, TokenLogprobs

_MASK_64 = (1 << 64) - 1
_GOLDEN_64 = 0x9E3779B97F4A7C15  # odd constant, spreads seeds apart before adding the position


def row_seed(seed: int, position: int) -> int:
    """The generator seed for the token at `position` of a job sampled with `seed`."""
    return (seed * _GOLDEN_64 + position) & _MASK_64


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> list[int]:
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
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> list[int]:
    device = logits.device
    vocab_size = logits.shape[1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    if any(p.top_k or p.top_p < 1 for p in params):
        probs = probs * _keep_mask(probs, params)
    # Clamp so a zero draw cannot turn a dropped token's 0 / 0 into NaN (argmax favours NaN).
    scores = probs / _exponentials(params, positions, vocab_size, device).clamp_min(1e-20)
    return scores.argmax(dim=-1).tolist()


def _keep_mask(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Which tokens survive top-k then top-p, as a bool mask in vocabulary order."""
    device = probs.device
    vocab_size = probs.shape[1]
    top_p = torch.tensor([p.top_p for p in params], device=device)
    # top_k = 0 (disabled) keeps the whole vocabulary.
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
    in_top_k = torch.arange(vocab_size, device=device)[None, :] < top_k[:, None]
    # Nucleus over the top-k survivors, renormalised (as HF and vLLM apply them in turn).
    sorted_probs = sorted_probs * in_top_k
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    # Keep a token while the mass before it is short of top_p. The top token always stays:
    # the mass before it is 0 and top_p > 0. in_top_k guards top_p = 1, where rounding can leave
    # the mass before a dropped token just under 1.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = in_top_k & (mass_before < top_p[:, None])
    return torch.zeros_like(keep_sorted).scatter_(1, sorted_ids, keep_sorted)


def _exponentials(
    params: Sequence[SamplingParams],
    positions: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Exp(1) noise [rows, vocab]: seeded rows from their own generator, the rest from torch's
    global one. NOTE: a seeded stream is reproducible per device type, not across cpu/cuda."""
    noise = torch.empty((len(params), vocab_size), device=device).exponential_()
    generator = torch.Generator(device=device)
    for row, (param, position) in enumerate(zip(params, positions, strict=True)):
        if param.seed is not None:
            generator.manual_seed(row_seed(param.seed, position))
            noise[row].exponential_(generator=generator)
    return noise


def logprobs(
    logits: torch.Tensor, tokens: Sequence[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """For the rows that asked: the log-probability of the sampled token and the top
    alternatives, from the model's raw distribution (what OpenAI and vLLM report)."""
    rows = [i for i, p in enumerate(params) if p.logprobs]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return result
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen_ids = torch.tensor([tokens[i] for i in rows], device=logp.device)
    chosen = logp.gather(1, chosen_ids[:, None]).squeeze(1).tolist()
    num_top = max(params[i].top_logprobs for i in rows)
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if num_top:
        values, ids = logp.topk(num_top, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, row in enumerate(rows):
        n = params[row].top_logprobs
        result[row] = TokenLogprobs(
            chosen[j], tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        )
    return result
