"""The benchmark's HTTP client for any OpenAI-compatible server: an open-loop replay of a
workload over streamed `/v1/completions` (one record per stream, SSE chunks counted), and a
burst for saturated throughput."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import aiohttp

from bench import loadgen, workload
from bench.metrics import RequestRecord
from bench.peer_servers import ServerError

# -- the HTTP load client


@dataclass(slots=True)
class StreamRecord:
    """A request as `metrics` sees it, plus its SSE chunk counts and its text."""

    record: RequestRecord
    num_chunks: int = 0  # SSE events with a choice (not the usage-only one, not [DONE])
    num_text_chunks: int = 0  # those with text
    text: str = ""


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    request: workload.Request,
    stream: StreamRecord,
    clock: Callable[[], float],
) -> None:
    record = stream.record
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record.sent_s = clock()
    parts = []
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                raise ServerError(f"HTTP {response.status}: {text}")
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(f"error event: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    stream.num_chunks += 1
                    if choice.get("text"):
                        if record.first_token_s is None:
                            record.first_token_s = clock()
                        stream.num_text_chunks += 1
                        parts.append(choice["text"])
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = usage.get("prompt_tokens", 0)
                    record.output_tokens = usage.get("completion_tokens", 0)
    except Exception as error:  # recorded, not raised: one failure must not end the run
        record.error = f"{type(error).__name__}: {error}"
    record.end_s = clock()
    stream.text = "".join(parts)
    if record.error is None and record.finish_reason is None:
        record.error = "stream ended without a finish reason"
    elif record.error is None and record.output_tokens == 0:
        record.error = "no usage in the stream (stream_options.include_usage unsupported?)"


async def replay(
    url: str,
    model: str,
    requests: Sequence[workload.Request],
    *,
    sequential: bool = False,
    max_concurrency: int = loadgen.DEFAULT_MAX_CONCURRENCY,
    on_progress: loadgen.OnProgress | None = None,
) -> list[StreamRecord]:
    """Open loop: each request at its `arrival_s`, whatever happened to the others (as
    `loadgen.replay` does over gRPC). `sequential`: one at a time, each counted from its send."""
    start = time.perf_counter()
    slots = asyncio.Semaphore(max_concurrency)
    num_done = 0

    def clock() -> float:
        return time.perf_counter() - start

    async def one(request: workload.Request, stream: StreamRecord) -> None:
        nonlocal num_done
        async with slots:
            await _stream(session, url, model, request, stream, clock)
        num_done += 1
        if on_progress is not None:
            on_progress(num_done, len(requests))

    streams = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        tasks = []
        for i, request in enumerate(requests):
            if sequential:
                stream = StreamRecord(RequestRecord(i, clock(), request.output_tokens))
                await one(request, stream)
            else:
                stream = StreamRecord(RequestRecord(i, request.arrival_s, request.output_tokens))
                delay_s = request.arrival_s - clock()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                tasks.append(asyncio.create_task(one(request, stream)))
            streams.append(stream)
        await asyncio.gather(*tasks)
    return streams


def run_replay(url: str, model: str, requests, **kwargs) -> list[StreamRecord]:
    return asyncio.run(replay(url, model, requests, **kwargs))


def burst_tokens_per_s(url: str, model: str, request: workload.Request, num: int) -> float:
    """Output tokens/s of `num` copies of `request` sent at once (as `loadgen`'s burst)."""
    streams = run_replay(url, model, [replace(request, arrival_s=0.0)] * num)
    records = [s.record for s in streams]
    if errors := {r.error for r in records if not r.ok}:
        raise ServerError(f"burst requests failed: {errors}")
    return sum(r.output_tokens for r in records) / max(r.end_s or 0.0 for r in records)


@dataclass(frozen=True, slots=True)
class ChunkCounts:
    """SSE chunks against output tokens, over the successful streams of a point."""

    streams: int = 0
    tokens: int = 0
    chunks: int = 0
    text_chunks: int = 0
    fewer: int = 0  # streams with fewer chunks than tokens: tokens merged into one chunk
    more: int = 0  # streams with more chunks than tokens

    def __add__(self, other: ChunkCounts) -> ChunkCounts:
        return ChunkCounts(
            self.streams + other.streams,
            self.tokens + other.tokens,
            self.chunks + other.chunks,
            self.text_chunks + other.text_chunks,
            self.fewer + other.fewer,
            self.more + other.more,
        )


def chunk_counts(streams: Sequence[StreamRecord]) -> ChunkCounts:
    done = [s for s in streams if s.record.ok]
    return ChunkCounts(
        streams=len(done),
        tokens=sum(s.record.output_tokens for s in done),
        chunks=sum(s.num_chunks for s in done),
        text_chunks=sum(s.num_text_chunks for s in done),
        fewer=sum(1 for s in done if s.num_chunks < s.record.output_tokens),
        more=sum(1 for s in done if s.num_chunks > s.record.output_tokens),
    )
