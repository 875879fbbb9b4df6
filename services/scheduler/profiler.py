"""Measures the engine's speed at start-up, on the real worker, and caches it on disk.

Prefill: one job of L prompt tokens, for L up to the context (and the token budget).
Decode: B jobs of one token each, for B up to the batch cap. Each point is the best of a few
runs of the whole command round trip, i.e. what an iteration costs the scheduler. The cache is
keyed by model, stage layout, device, dtype, block size and the ranges measured (the longest
prompt and the largest batch that the caps and the KV pool allow), so a second start skips the
work, and a profile measured on a small pool is not reused for a larger one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from services.scheduler.core import Decision, ScheduledChunk
from services.scheduler.core.job import SamplingParams
from services.scheduler.core.profile import PerformanceProfile
from services.scheduler.pipeline import Pipeline
from services.scheduler.worker_link import WorkerInfo

log = logging.getLogger(__name__)

PREFILL_LENGTHS = (1, 16, 64, 128, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_CONTEXT = 32
REPEATS = 3
# Points slower than this are measured once, and longer prompts are not measured at all (the
# profile extrapolates): start-up should cost seconds, not minutes, on a slow CPU.
SLOW_POINT_S = 0.5
_GREEDY = SamplingParams()


def _longest_prefill(info: WorkerInfo, max_batched_tokens: int) -> int:
    return min(info.max_model_len - 1, max_batched_tokens, info.num_blocks * info.block_size)


def _blocks_per_decode_job(info: WorkerInfo) -> int:
    return -(-(DECODE_CONTEXT + 1) // info.block_size)


def _largest_batch(info: WorkerInfo, max_batch_size: int) -> int:
    return max(1, min(max_batch_size, info.num_blocks // _blocks_per_decode_job(info)))


def profile_key(info: WorkerInfo, max_batch_size: int, max_batched_tokens: int) -> dict:
    return {
        "model": info.model_name,
        "stages": list(info.layer_split) or [info.num_total_layers],
        "device": info.device,
        "dtype": info.dtype,
        "block_size": info.block_size,
        "max_batch_size": max_batch_size,
        "max_batched_tokens": max_batched_tokens,
        "longest_prefill": _longest_prefill(info, max_batched_tokens),
        "largest_batch": _largest_batch(info, max_batch_size),
        # Bumped whenever the engine changes what a step costs, so no profile of another
        # engine is reused.
        "version": 4,
    }


def load_or_measure(
    worker: Pipeline,
    info: WorkerInfo,
    *,
    max_batch_size: int,
    max_batched_tokens: int,
    cache_dir: Path | None = None,
) -> PerformanceProfile:
    key = profile_key(info, max_batch_size, max_batched_tokens)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{digest}.json" if cache_dir else None
    if path and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                log.info("profile: reusing %s", path)
                return PerformanceProfile.from_dict(data["profile"])
        except (ValueError, KeyError, OSError) as exc:
            log.warning("profile: ignoring unreadable cache %s: %s", path, exc)
    started = time.perf_counter()
    profile = measure(worker, info, max_batch_size, max_batched_tokens)
    log.info(
        "profile: measured in %.1fs: decode(1)=%.1fms prefill(%d)=%.1fms",
        time.perf_counter() - started,
        1000 * profile.decode_time(1),
        profile.prefill_s[-1][0],
        1000 * profile.prefill_s[-1][1],
    )
    if path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_suffix(".tmp")
            scratch.write_text(json.dumps({"key": key, "profile": profile.to_dict()}, indent=1))
            scratch.replace(path)
        except OSError as exc:
            log.warning("profile: cannot cache to %s: %s", path, exc)
    return profile


def measure(
    worker: Pipeline, info: WorkerInfo, max_batch_size: int, max_batched_tokens: int
) -> PerformanceProfile:
    longest = _longest_prefill(info, max_batched_tokens)
    lengths = [n for n in PREFILL_LENGTHS if n <= longest] or [1]
    _time_prefill(worker, info, lengths[0], repeats=1)  # warm-up
    prefill = []
    for n in lengths:
        prefill.append((n, _time_prefill(worker, info, n, REPEATS)))
        if prefill[-1][1] > SLOW_POINT_S:
            break
    blocks_per_job = _blocks_per_decode_job(info)
    fits = _largest_batch(info, max_batch_size)
    batches = sorted({b for b in DECODE_BATCHES if b <= fits} | {fits})
    decode = [(b, _time_decode(worker, info, b, blocks_per_job)) for b in batches]
    worker.open()  # forget the profiling jobs' blocks
    return PerformanceProfile(prefill_s=non_decreasing(prefill), decode_s=non_decreasing(decode))


def non_decreasing(points: list[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """Lowers each time to the smallest at any larger size: more tokens or jobs never cost
    less, so a point above a later one was slowed by something else (another process had the
    cores), and left as is it would rank a 1-token prompt below a 64-token one in skip-join."""
    result = list(points)
    for i in range(len(result) - 2, -1, -1):
        result[i] = (result[i][0], min(result[i][1], result[i + 1][1]))
    return tuple(result)


def _tokens(n: int, vocab_size: int, salt: int = 0) -> list[int]:
    return [(salt * 31 + i * 7919) % max(vocab_size - 1, 1) + 1 for i in range(n)]


def _run(worker: Pipeline, chunks: list[ScheduledChunk], free: list[str]) -> float:
    decision = Decision(iteration_id=0, chunks=chunks, free_job_ids=free)
    started = time.perf_counter()
    worker.execute(decision)
    return time.perf_counter() - started


def _time_prefill(worker: Pipeline, info: WorkerInfo, n: int, repeats: int) -> float:
    """Best of `repeats` runs; a single run when the first is slow."""
    blocks = list(range(-(-n // info.block_size)))
    chunk = ScheduledChunk("profile-prefill", _tokens(n, info.vocab_size), 0, blocks, True, _GREEDY)
    best = _run(worker, [chunk], ["profile-prefill"])
    if best < SLOW_POINT_S:
        best = min(
            [best] + [_run(worker, [chunk], ["profile-prefill"]) for _ in range(repeats - 1)]
        )
    _run(worker, [], ["profile-prefill"])
    return best


def _time_decode(worker: Pipeline, info: WorkerInfo, batch: int, blocks_per_job: int) -> float:
    ids = [f"profile-decode-{i}" for i in range(batch)]
    tables = [list(range(i * blocks_per_job, (i + 1) * blocks_per_job)) for i in range(batch)]
    prefills = [
        ScheduledChunk(ids[i], _tokens(DECODE_CONTEXT, info.vocab_size, i), 0, tables[i], True,
                       _GREEDY)
        for i in range(batch)
    ]  # fmt: skip
    _run(worker, prefills, ids)
    decodes = [
        ScheduledChunk(ids[i], [7], DECODE_CONTEXT, tables[i], True, _GREEDY) for i in range(batch)
    ]
    # Every decode writes the same position, so repeats see the same context length.
    best = min(_run(worker, decodes, []) for _ in range(REPEATS + 1))
    _run(worker, [], ids)
    return best
