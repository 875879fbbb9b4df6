"""Open-loop asyncio load client: replays a workload against a FastServe frontend.

Each request is sent at its arrival time whatever happened to earlier ones (open loop, as the
paper's client), with at most `max_concurrency` in flight; latencies count from the arrival time,
so time spent held back by that bound counts as queueing. One `AsyncClient` (one channel, one
event loop) carries every request and the per-chunk work is a few attribute reads, so the client
stays far from being the bottleneck at the rates a CPU server sustains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from bench.metrics import RequestRecord
from bench.workload import Request
from fastserve_client import AsyncClient

DEFAULT_MAX_CONCURRENCY = 4096

# Called after each request finishes with (requests finished, requests in the workload).
OnProgress = Callable[[int, int], None]


async def _send(
    client: AsyncClient,
    request: Request,
    record: RequestRecord,
    clock: Callable[[], float],
    timeout_s: float | None,
) -> None:
    record.sent_s = clock()
    try:
        stream = client.generate(
            request.prompt,
            max_tokens=request.output_tokens,
            temperature=0,
            ignore_eos=True,
            timeout=timeout_s,
        )
        async for chunk in stream:
            if chunk.state == "preempted":
                record.num_preemptions += 1
            elif chunk.state == "queued" and record.queue_level is None:
                record.queue_level = chunk.queue_level
            if chunk.token_ids and record.first_token_s is None:
                record.first_token_s = clock()
            if chunk.usage is not None:
                record.prompt_tokens = chunk.usage.prompt_tokens
                record.output_tokens = chunk.usage.completion_tokens
            if chunk.finish_reason is not None:
                record.finish_reason = chunk.finish_reason
    except Exception as error:  # recorded, not raised: one failure must not end the run
        record.error = f"{type(error).__name__}: {error}"
    record.end_s = clock()
    if record.error is None and record.finish_reason is None:
        record.error = "stream ended without a finish reason"


async def replay(
    address: str,
    requests: Sequence[Request],
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    timeout_s: float | None = None,
    on_progress: OnProgress | None = None,
) -> list[RequestRecord]:
    """Sends every request at its `arrival_s` (seconds from now); returns when all finished."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    slots = asyncio.Semaphore(max_concurrency)
    start = time.perf_counter()
    num_done = 0

    def clock() -> float:
        return time.perf_counter() - start

    async def one(request: Request, record: RequestRecord) -> None:
        nonlocal num_done
        async with slots:
            await _send(client, request, record, clock, timeout_s)
        num_done += 1
        if on_progress is not None:
            on_progress(num_done, len(requests))

    records = [RequestRecord(i, r.arrival_s, r.output_tokens) for i, r in enumerate(requests)]
    async with AsyncClient(address) as client:
        tasks = []
        for request, record in zip(requests, records, strict=True):
            delay_s = request.arrival_s - clock()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(request, record)))
        await asyncio.gather(*tasks)
    return records


async def replay_sequential(
    address: str, requests: Sequence[Request], *, timeout_s: float | None = None
) -> list[RequestRecord]:
    """Sends the requests one at a time, each when the previous one finished (no queueing):
    the unloaded latencies. Arrival times are ignored; each counts from its own send."""
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    records = []
    async with AsyncClient(address) as client:
        for i, request in enumerate(requests):
            record = RequestRecord(i, clock(), request.output_tokens)
            await _send(client, request, record, clock, timeout_s)
            records.append(record)
    return records


def run_replay(address: str, requests: Sequence[Request], **kwargs) -> list[RequestRecord]:
    """`replay` in a fresh event loop (a grpc.aio channel belongs to one loop)."""
    return asyncio.run(replay(address, requests, **kwargs))


def run_sequential(address: str, requests: Sequence[Request], **kwargs) -> list[RequestRecord]:
    """`replay_sequential` in a fresh event loop."""
    return asyncio.run(replay_sequential(address, requests, **kwargs))


def burst_tokens_per_s(address: str, request: Request, num_requests: int) -> float:
    """Output tokens/s of `num_requests` copies of `request` sent at once: the server's throughput
    with a full batch (the copies are alike, so the batch stays full until near the end)."""
    records = run_replay(address, [replace(request, arrival_s=0.0)] * num_requests)
    errors = {r.error for r in records if not r.ok}
    if errors:
        raise RuntimeError(f"burst requests failed: {errors}")
    return sum(r.output_tokens for r in records) / max(r.end_s or 0.0 for r in records)
