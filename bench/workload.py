"""Synthetic request workloads shaped like the FastServe paper's: pure, deterministic by seed.

The paper (Wu et al. 2023, section 6) replays ShareGPT and Alpaca with Poisson arrivals (and
Gamma arrivals for burstiness). Those data sets cannot be downloaded here, so lengths are drawn
from log-normal distributions fitted to their published averages (Kwon et al. 2023, the vLLM
paper, Fig. 11: ShareGPT 161 prompt / 338 output tokens; Alpaca 19.31 / 58.45).

Lengths. Each data set is a pair of independent log-normals (prompt, output), rounded to whole
tokens, then filtered as the FastServe artifact and vLLM's benchmark do: a pair is dropped and
redrawn if prompt < 4 or output < 4, prompt > 1,024, or prompt + output > 2,048. The spreads
(`sigma`) are our choice, not published numbers: long tails similar to the histograms in the vLLM
paper (ShareGPT: P99 / median about 8 for prompts and 5.5 for outputs). The location (`mu`) was
then solved numerically (2M draws, common random numbers) so that the mean *after* the filter
equals the published average; the resulting shapes:

    data set  part    mu      sigma  mean   median  P90   P99
    sharegpt  prompt  4.6841  1.0    161    106     365   806
    sharegpt  output  5.5451  0.8    338    254     694   1408
    alpaca    prompt  2.7753  0.6    19.3   16      35    65
    alpaca    output  3.7483  0.8    58.5   42      118   273

`scale` then shrinks both lengths (for slow CPUs and small models: 0.25 maps the 2,048-token
limit onto a 512-token context), rounding to at least one token; finally prompt and output are
clipped to `max_context_tokens` (prompt first, the output gets what is left).

Arrivals. Gaps between requests are exponential (a Poisson process) or Gamma with a chosen
coefficient of variation (shape k = 1 / CV^2, scale = 1 / (rate * k), so the mean gap stays
1 / rate; CV > 1 is burstier than Poisson). Gaps are drawn for rate 1 and divided by the rate,
so every rate replays the same requests in the same pattern, only compressed.

Prompts are random common English words, each one token in Llama-style BPE vocabularies
(SmolLM2's tokenizer gives exactly one token per word); counts are approximate for other
tokenizers, which is fine since reports use the token counts the server returns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Filter of the FastServe artifact (and vLLM's benchmark_serving), in unscaled tokens.
MIN_TOKENS = 4
MAX_PROMPT_TOKENS = 1024
MAX_TOTAL_TOKENS = 2048

# Common English words that are single tokens (with their leading space) in Llama-style BPEs.
_WORDS_TEXT = (
    "the of and to in is that it was for on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know"
)
WORDS = tuple(_WORDS_TEXT.split())


@dataclass(frozen=True, slots=True)
class LogNormal:
    """A log-normal length distribution: exp(mu + sigma * N(0, 1)), in tokens."""

    mu: float
    sigma: float

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def sample(self, rng: random.Random) -> int:
        return round(rng.lognormvariate(self.mu, self.sigma))


@dataclass(frozen=True, slots=True)
class Dataset:
    """Prompt and output length distributions standing in for a real data set."""

    name: str
    prompt: LogNormal
    output: LogNormal
    # Published averages the distributions are fitted to (after the filter), for reports.
    mean_prompt_tokens: float
    mean_output_tokens: float


DATASETS = {
    "sharegpt": Dataset("sharegpt", LogNormal(4.6841, 1.0), LogNormal(5.5451, 0.8), 161, 338),
    "alpaca": Dataset("alpaca", LogNormal(2.7753, 0.6), LogNormal(3.7483, 0.8), 19.31, 58.45),
}


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload."""

    # Seconds after the start of the run at which the request is sent.
    arrival_s: float
    # Prompt text, about the intended number of tokens long.
    prompt: str
    # Tokens to generate (sent as max_tokens with ignore_eos, as the paper does).
    output_tokens: int

    @property
    def num_prompt_words(self) -> int:
        """The intended prompt length in tokens (one token per word in Llama-style BPEs)."""
        return len(self.prompt.split())


def unit_gaps(
    num_requests: int, rng: random.Random, *, arrival: str = "poisson", cv: float = 1.0
) -> list[float]:
    """Gaps between consecutive arrivals at 1 request/s: exponential, or Gamma with CV `cv`."""
    if arrival == "poisson":
        return [rng.expovariate(1.0) for _ in range(num_requests)]
    if arrival == "gamma":
        if cv <= 0:
            raise ValueError(f"cv must be > 0, got {cv}")
        shape = 1.0 / cv**2
        return [rng.gammavariate(shape, 1.0 / shape) for _ in range(num_requests)]
    raise ValueError(f"unknown arrival process {arrival!r}; choose poisson or gamma")


def sample_lengths(
    num_requests: int,
    dataset: Dataset,
    rng: random.Random,
    *,
    scale: float = 1.0,
    max_context_tokens: int | None = None,
) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) pairs: filtered as the artifact does, scaled, clipped."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if max_context_tokens is not None and max_context_tokens < 2:
        raise ValueError(f"max_context_tokens must be >= 2, got {max_context_tokens}")
    pairs = []
    while len(pairs) < num_requests:
        prompt, output = dataset.prompt.sample(rng), dataset.output.sample(rng)
        if min(prompt, output) < MIN_TOKENS or prompt > MAX_PROMPT_TOKENS:
            continue
        if prompt + output > MAX_TOTAL_TOKENS:
            continue
        prompt, output = max(1, round(prompt * scale)), max(1, round(output * scale))
        if max_context_tokens is not None:
            prompt = min(prompt, max_context_tokens - 1)
            output = min(output, max_context_tokens - prompt)
        pairs.append((prompt, output))
    return pairs


def make_prompt(num_tokens: int, rng: random.Random) -> str:
    """Text of `num_tokens` random common words (about as many tokens)."""
    return " ".join(rng.choice(WORDS) for _ in range(num_tokens))


def make_workload(
    num_requests: int,
    rate_rps: float,
    *,
    dataset: str = "sharegpt",
    arrival: str = "poisson",
    cv: float = 1.0,
    scale: float = 1.0,
    max_context_tokens: int | None = None,
    seed: int = 0,
) -> list[Request]:
    """`num_requests` requests arriving at `rate_rps` on average, the first at its first gap.

    The same seed gives the same prompts and lengths at every rate, and the same arrival pattern
    scaled by 1 / rate.
    """
    if rate_rps <= 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    try:
        shape = DATASETS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}") from None
    # Separate streams, so that changing the arrival process keeps the same requests.
    length_rng = random.Random(f"{seed}-lengths")
    prompt_rng = random.Random(f"{seed}-prompts")
    arrival_rng = random.Random(f"{seed}-arrivals")
    lengths = sample_lengths(
        num_requests, shape, length_rng, scale=scale, max_context_tokens=max_context_tokens
    )
    gaps = unit_gaps(num_requests, arrival_rng, arrival=arrival, cv=cv)
    requests, now_s = [], 0.0
    for (prompt_tokens, output_tokens), gap in zip(lengths, gaps, strict=True):
        now_s += gap / rate_rps
        requests.append(Request(now_s, make_prompt(prompt_tokens, prompt_rng), output_tokens))
    return requests


def mean_lengths(requests: list[Request]) -> tuple[float, float]:
    """Mean intended prompt and output tokens of a workload."""
    if not requests:
        return 0.0, 0.0
    num = len(requests)
    return (
        sum(r.num_prompt_words for r in requests) / num,
        sum(r.output_tokens for r in requests) / num,
    )
