"""Turns one row of logits per job into one token per job, for the whole batch at once.

Greedy rows take the argmax. Other rows are divided by their temperature, cut to the top-k, cut
to the nucleus (top-p: the smallest prefix of the sorted distribution whose probability reaches
top_p, never empty), and sampled with the exponential race: token = argmax(p_i / E_i) with
E_i ~ Exp(1) drawn per token, which picks i with probability p_i (as vLLM does).

We use the race rather than inverse-CDF or torch.multinomial because it is stable: a seeded
row's noise depends only on (seed, position), and a tiny change of the logits (another batch
composition sums in another order) changes the pick only if two tokens nearly tie for the
maximum. Inverse-CDF over a flat 50k-token distribution flips tokens on 1e-6 perturbations,
which would break "re-batching or recomputation samples the same token".

The step runs on the logits' device with no Python per row: the rows' settings are packed into
one int64 buffer on the host (`SamplingBatch`, one host-to-device copy), every row goes through
the same tensor ops (greedy rows take their argmax in the same pass), and the sampled ids come
back with one device-to-host copy.

The noise is counter-based: token i of a row keyed k gets the uniform made from the 64-bit
splitmix64 hash of (k, i), and E_i = -log(U_i). A seeded row's key is `row_seed(seed, position)`,
so its uniforms are the same bits whatever the rest of the batch, its place in it or the device
(the hash is plain int64 arithmetic, which wraps the same on CPU and CUDA; `noise_bits` is
checked against a pure-Python reference). Unseeded rows take keys from torch's default (CPU)
generator, one per row per step, so `torch.manual_seed` makes them repeatable too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.common.sampling import SamplingParams, TokenLogprobs
from services.worker.host_to_device import to_device

_MASK_64 = (1 << 64) - 1
_GOLDEN_64 = 0x9E3779B97F4A7C15  # odd constant, spreads seeds apart before adding the position
_MIX_1 = 0xBF58476D1CE4E5B9  # splitmix64's finaliser multipliers
_MIX_2 = 0x94D049BB133111EB
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_TWO_TO_MINUS_53 = 2.0**-53
# Rows of SamplingBatch.packed, int64 [fields, B]; float fields travel as their float64 bits.
# Column j describes batch row packed[_ROW, j]: rows that filter first, then the other random
# rows, then the greedy ones, so each stage of the step works on a prefix.
_ROW, _TOP_K, _KEY, _TEMPERATURE, _TOP_P = range(5)


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    value &= _MASK_64
    return value - (1 << 64) if value > _INT64_MAX else value


def row_seed(seed: int, position: int) -> int:
    """The noise key of the token at `position` of a job sampled with `seed` (uint64)."""
    return (seed * _GOLDEN_64 + position) & _MASK_64


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: mask off the copied sign)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (multiplication wraps modulo 2**64 on every device)."""
    z = (z ^ _srl(z, 30)) * _signed(_MIX_1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX_2)
    return z ^ _srl(z, 31)


def _xorshift_(z: torch.Tensor, scratch: torch.Tensor, shift: int) -> None:
    """z ^= z >>> shift, in place (the [rows, vocab] tensors are large: no temporaries)."""
    torch.bitwise_right_shift(z, shift, out=scratch)
    scratch &= (1 << (64 - shift)) - 1
    z ^= scratch


def noise_bits(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [rows, vocab]: hash of (key of the row, token index): mix(mix(key) + (i + 1) * G),
    i.e. token i's output of a splitmix64 stream started at mix(key)."""
    return _noise_bits(keys, torch.arange(vocab_size, dtype=torch.int64, device=keys.device))


def _noise_bits(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """noise_bits at `token_ids`: [vocab] for every row, or [rows, k] per row."""
    z = _mix(keys)[:, None] + (token_ids + 1) * _signed(_GOLDEN_64)
    scratch = torch.empty_like(z)
    _xorshift_(z, scratch, 30)
    z *= _signed(_MIX_1)
    _xorshift_(z, scratch, 27)
    z *= _signed(_MIX_2)
    _xorshift_(z, scratch, 31)
    return z


def exponentials(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise float32 [rows, vocab] from each row's key: U = (top 53 bits + 1) / 2**53 in
    (0, 1], E = -log(U), computed in float64 so no bin near 0 biases the race."""
    return _exponentials(noise_bits(keys, vocab_size))


def exponentials_at(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`exponentials` at `token_ids` [rows, k] only: the same values as the whole rows'."""
    return _exponentials(_noise_bits(keys, token_ids))


def _exponentials(bits: torch.Tensor) -> torch.Tensor:
    bits >>= 11
    bits &= (1 << 53) - 1
    bits += 1
    uniform = bits.double()
    uniform *= _TWO_TO_MINUS_53
    return uniform.log_().neg_().float()


def reference_noise_bits(key: int, index: int) -> int:
    """`noise_bits` of one (key, token index) in Python integers: the device-free definition."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * _MIX_1) & _MASK_64
        z = ((z ^ (z >> 27)) * _MIX_2) & _MASK_64
        return z ^ (z >> 31)

    return mix((mix(key & _MASK_64) + (index + 1) * _GOLDEN_64) & _MASK_64)


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """A step's per-row settings as device tensors, built once per step with one copy."""

    packed: torch.Tensor  # int64 [5, B], fields _ROW .. _TOP_P, columns in the order above
    num_random: int  # rows that are not greedy: the first num_random columns
    num_filter: int  # random rows with top-k or top-p: the first num_filter columns
    max_top_k: int  # largest top-k of the filtering rows (the vocabulary size if one has none)

    @staticmethod
    def build(
        params: Sequence[SamplingParams],
        positions: Sequence[int],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        filtering = [
            i for i, p in enumerate(params) if not p.is_greedy and (p.top_k or p.top_p < 1)
        ]
        plain = [
            i for i, p in enumerate(params) if not p.is_greedy and not p.top_k and p.top_p == 1
        ]
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        order = filtering + plain + greedy
        random = [params[i] for i in order[: len(filtering) + len(plain)]]
        host = np.zeros((5, len(params)), dtype=np.int64)
        host[_ROW] = order
        top_k = [min(p.top_k or vocab_size, vocab_size) for p in random]
        host[_TOP_K, : len(random)] = top_k
        host[_TEMPERATURE, : len(random)] = np.array(
            [p.temperature for p in random], dtype=np.float64
        ).view(np.int64)
        host[_TOP_P, : len(random)] = np.array([p.top_p for p in random], dtype=np.float64).view(
            np.int64
        )
        # Seeded rows are keyed by (seed, position) only; unseeded ones take fresh keys from
        # torch's default generator (torch.manual_seed repeats them); greedy rows need none.
        seeded = [j for j, p in enumerate(random) if p.seed is not None]
        if seeded:
            host[_KEY, seeded] = [
                _signed(row_seed(random[j].seed or 0, positions[order[j]])) for j in seeded
            ]
        if len(seeded) < len(random):
            unseeded = [j for j, p in enumerate(random) if p.seed is None]
            fresh = torch.randint(_INT64_MIN, _INT64_MAX, (len(unseeded),), dtype=torch.int64)
            host[_KEY, unseeded] = fresh.numpy()
        return SamplingBatch(
            packed=to_device(host, device),
            num_random=len(random),
            num_filter=len(filtering),
            max_top_k=max(top_k[: len(filtering)], default=vocab_size),
        )


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> list[int]:
    """One token per row of `logits` [B, V], on the host: `sample_ids` and its one
    device-to-host copy."""
    tokens: list[int] = sample_ids(logits, params, positions).tolist()
    return tokens


def sample_ids(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> torch.Tensor:
    """One token per row of `logits` [B, V], as int64 ids on its device (nothing waits for
    them: the worker reads them after launching its next step).

    `positions[i]` is the position the sampled token will take in its job (prompt + output so
    far), which keys the noise of seeded rows.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(positions):
        raise ValueError(
            f"need logits [B, V] with B = len(params) = len(positions); got "
            f"{tuple(logits.shape)}, {len(params)}, {len(positions)}"
        )
    if not params:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    batch = SamplingBatch.build(params, positions, logits.shape[1], logits.device)
    return sample_on_device(logits, batch)


def sample_on_device(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The sampled ids as an int64 tensor [B] on the logits' device (no host copy). Every
    row's argmax, then the race over the random rows (the filters over those that filter),
    written over their argmax: the same ops whatever the batch's size and mix."""
    picks = logits.argmax(dim=-1)
    num_random, num_filter = batch.num_random, batch.num_filter
    if not num_random:
        return picks
    packed = batch.packed[:, :num_random]
    rows = packed[_ROW]
    temperature = packed[_TEMPERATURE].view(torch.float64).float()
    probs = torch.softmax(logits[rows].float() / temperature[:, None], dim=-1)
    races = []
    if num_filter:  # the race among each row's survivors only: noise for those tokens alone
        races.append(
            _filtered_race(
                probs[:num_filter],
                packed[_TOP_K, :num_filter],
                packed[_TOP_P, :num_filter].view(torch.float64).float(),
                batch.max_top_k,
                packed[_KEY, :num_filter],
            )
        )
    if num_random > num_filter:
        # Clamp so a zero draw cannot turn a 0 / 0 into NaN (argmax favours NaN).
        noise = exponentials(packed[_KEY, num_filter:], logits.shape[1]).clamp_min_(1e-20)
        races.append((probs[num_filter:] / noise).argmax(dim=-1))
    return picks.index_put_((rows,), torch.cat(races) if len(races) > 1 else races[0])


def _filtered_race(
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    max_top_k: int,
    keys: torch.Tensor,
) -> torch.Tensor:
    """The exponential race among the tokens that survive top-k then top-p (`_keep_mask`'s),
    in each row's sorted candidates: the winner of the whole-vocabulary race with the others'
    probabilities zeroed, at the cost of the candidates' noise only."""
    vocab_size = probs.shape[1]
    total = probs.sum(-1)
    if max_top_k < vocab_size:
        return _race(*torch.topk(probs, max_top_k, dim=-1), top_k, top_p, total, keys, vocab_size)
    probe = min(NUCLEUS_PROBE, vocab_size)
    if probe == vocab_size or probs.device.type != "cpu":
        ordered = torch.sort(probs, dim=-1, descending=True)
        return _race(*ordered, top_k, top_p, total, keys, vocab_size)
    head_probs, head_ids = torch.topk(probs, probe, dim=-1)
    fits = (top_k <= probe) | ((top_k >= vocab_size) & (head_probs.sum(-1) >= top_p * total))
    if bool(fits.all()):
        return _race(head_probs, head_ids, top_k, top_p, total, keys, vocab_size)
    winners = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
    winners[fits] = _race(
        head_probs[fits], head_ids[fits], top_k[fits], top_p[fits], total[fits], keys[fits],
        vocab_size,
    )  # fmt: skip
    rest = ~fits
    winners[rest] = _race(
        *torch.sort(probs[rest], dim=-1, descending=True), top_k[rest], top_p[rest],
        total[rest], keys[rest], vocab_size,
    )  # fmt: skip
    return winners


def _race(
    sorted_probs: torch.Tensor,
    sorted_ids: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    total: torch.Tensor,
    keys: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """The race over sorted candidates that hold each row's nucleus."""
    keep = _survivors(sorted_probs, top_k, top_p, total, vocab_size)
    noise = exponentials_at(keys, sorted_ids).clamp_min_(1e-20)
    scores = torch.where(keep, sorted_probs / noise, -1.0)  # a survivor scores >= 0
    return sorted_ids.gather(1, scores.argmax(dim=-1, keepdim=True)).squeeze(1)


# On CPU, top-p without top-k first looks for the nucleus among this many most likely tokens:
# a row whose nucleus ends there (most rows: LLM distributions are peaked) needs no full sort of
# the vocabulary; the others are sorted whole. Either way, the same tokens are kept.
NUCLEUS_PROBE = 1024


def _keep_mask(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """Which tokens survive top-k then top-p, as a bool mask in vocabulary order. `top_k` [B]
    counts tokens (the vocabulary size where disabled), at most `max_top_k`; `top_p` [B] in
    (0, 1]. Only the `max_top_k` most likely tokens are sorted; for top-p alone, the
    NUCLEUS_PROBE most likely, and the whole vocabulary only for rows whose nucleus is wider."""
    vocab_size = probs.shape[1]
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    if max_top_k < vocab_size:
        return _keep_sorted(keep, *torch.topk(probs, max_top_k, dim=-1), top_k, top_p)
    probe = min(NUCLEUS_PROBE, vocab_size)
    # On a GPU the whole sort is cheap and choosing rows would cost a host round trip.
    total = probs.sum(-1)
    if probe == vocab_size or probs.device.type != "cpu":
        return _keep_sorted(keep, *torch.sort(probs, dim=-1, descending=True), top_k, top_p, total)
    head_probs, head_ids = torch.topk(probs, probe, dim=-1)
    # The nucleus ends within the head when the row's top-k does (a top-k of at most `probe`:
    # its renormalising mass is in the head too) or, top-k off, when the head's mass reaches
    # top_p: every token past it has at least that much mass before it.
    top_k_off = top_k >= vocab_size
    fits = (top_k <= probe) | (top_k_off & (head_probs.sum(-1) >= top_p * total))
    if bool(fits.all()):
        return _keep_sorted(keep, head_probs, head_ids, top_k, top_p, total)
    rest = ~fits
    keep[fits] = _keep_sorted(
        keep[fits], head_probs[fits], head_ids[fits], top_k[fits], top_p[fits], total[fits],
    )  # fmt: skip
    keep[rest] = _keep_sorted(
        keep[rest], *torch.sort(probs[rest], dim=-1, descending=True), top_k[rest], top_p[rest],
        total[rest],
    )  # fmt: skip
    return keep


def _keep_sorted(
    keep: torch.Tensor,
    sorted_probs: torch.Tensor,
    sorted_ids: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """`keep` (all False) with the survivors set (see `_survivors`)."""
    if total is None:
        total = sorted_probs.sum(-1)
    survivors = _survivors(sorted_probs, top_k, top_p, total, keep.shape[1])
    return keep.scatter_(1, sorted_ids, survivors)


def _survivors(
    sorted_probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    total: torch.Tensor,
    vocab_size: int,
) -> torch.Tensor:
    """Which of each row's most likely tokens in order (`sorted_probs`: a prefix of the sorted
    vocabulary that holds the nucleus) survive top-k then top-p, bool [B, k]. `total` [B]: the
    whole row's mass, which renormalises rows whose top-k is off."""
    ranks = torch.arange(sorted_probs.shape[1], device=sorted_probs.device)
    in_top_k = ranks[None, :] < top_k[:, None]
    # Nucleus over the top-k survivors, renormalised (as HF and vLLM apply them in turn).
    sorted_probs = sorted_probs * in_top_k
    mass = sorted_probs.sum(dim=-1, keepdim=True)
    mass = torch.where(top_k[:, None] >= vocab_size, total[:, None], mass)
    sorted_probs = sorted_probs / mass
    # Keep a token while the mass before it is short of top_p. The top token always stays:
    # the mass before it is 0 and top_p > 0. top_p = 1 keeps every top-k survivor, whatever
    # the rounding of the running sum near 1.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    return in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1))


def logprobs(
    logits: torch.Tensor, tokens: Sequence[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """For the rows that asked: the log-probability of the sampled token and the top
    alternatives, from the model's raw distribution (what OpenAI and vLLM report). Nothing runs
    when no row asked; otherwise one device-to-host copy for all of them."""
    rows = [i for i, p in enumerate(params) if p.logprobs]
    result: list[TokenLogprobs | None] = [None] * len(params)
    if not rows:
        return result
    device = logits.device
    # One host-to-device copy: the rows that asked, then their sampled ids.
    index = torch.tensor(rows + [tokens[i] for i in rows], device=device)
    logp = torch.log_softmax(logits[index[: len(rows)]].float(), dim=-1)
    columns = [logp.gather(1, index[len(rows) :, None]).double()]
    num_top = max(params[i].top_logprobs for i in rows)
    if num_top:
        values, ids = logp.topk(num_top, dim=-1)
        columns += [values.double(), ids.double()]  # ids < 2**53: exact in float64
    host = torch.cat(columns, dim=1).tolist()
    for j, row in enumerate(rows):
        n = params[row].top_logprobs
        values_j = host[j][1 : 1 + num_top]
        ids_j = host[j][1 + num_top :]
        result[row] = TokenLogprobs(
            host[j][0],
            tuple((int(t), v) for t, v in zip(ids_j[:n], values_j[:n], strict=True)),
        )
    return result
