"""FastServe against another OpenAI-compatible server (vLLM's CPU build by default) on the same
requests, in one run, one server at a time.

Every server gets the same workload (`bench/workload.py`) over OpenAI HTTP: `/v1/completions`,
streamed, temperature 0, `ignore_eos` with `max_tokens` = the intended output length, Poisson
(or Gamma) arrivals from an open-loop client. Per server: a greedy check against the first
FastServe (the same text for a few prompts, so a peer that loaded the weights wrongly is caught
before anything is timed), a warm-up, the unloaded per-token latency (requests one at a time)
and the saturated output throughput (a burst of requests at once). Rates are fractions of the
slower server's capacity; the SLO is `--slo-factor` x the better unloaded per-token latency. The
report gives per-token latency (mean, P95), TTFT and throughput per rate, the throughput at the
SLO (interpolated where latency crosses it), FastServe / peer ratios, and per-stream SSE chunk
counts against token counts. See bench/README.md. Usage:

    .venv/bin/python bench/peers.py [--num-requests 100] [--fastserve-variant fcfs:--policy fcfs]
    .venv/bin/python bench/peers.py --peer-url http://127.0.0.1:8000 --peer-label my-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from tqdm import tqdm

from bench import loadgen, metrics, peer_servers, workload
from bench.metrics import RequestRecord, RunMetrics
from bench.peer_servers import Server, ServerError
from bench.policies import Sweep, ms, plot, ratio, table

DEFAULT_FRACTIONS = [0.3, 0.6, 1.0, 1.5, 2.0]
# Greedy check: completions both servers must agree on (token by token, at temperature 0).
CHECK_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
]
SHORT_REQUEST = workload.Request(0.0, "the " * 8, 8)


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """A server of the run: a FastServe variant (its `fastserve up` flags), or the peer."""

    label: str
    kind: str  # "fastserve", "vllm" or "url"
    flags: tuple[str, ...] = ()
    url: str | None = None

    @property
    def is_fastserve(self) -> bool:
        return self.kind == "fastserve"


def parse_variant(text: str) -> ServerSpec:
    """`LABEL:FLAGS`, e.g. `fcfs:--policy fcfs`: a FastServe variant with extra `up` flags."""
    label, has_flags, flags = text.partition(":")
    if not label or not has_flags:
        raise ValueError(f"fastserve variant {text!r} is not LABEL:FLAGS (e.g. fcfs:--policy fcfs)")
    return ServerSpec(label.strip(), "fastserve", tuple(shlex.split(flags)))


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


# -- the greedy check


@dataclass(frozen=True, slots=True)
class GreedyAnswer:
    text: str
    tokens: tuple[str, ...]  # the server's per-token texts (completions logprobs), if it gave them
    num_tokens: int  # usage.completion_tokens


@dataclass(frozen=True, slots=True)
class GreedyComparison:
    server: str
    prompt: str
    reference: GreedyAnswer
    answer: GreedyAnswer
    agreed_tokens: int  # leading reference tokens the answer reproduces

    @property
    def identical(self) -> bool:
        return self.answer.text == self.reference.text


class GreedyMismatch(RuntimeError):
    """A server's greedy text differs from the reference's too early (or is empty/garbage)."""


def greedy_answer(url: str, model: str, prompt: str, num_tokens: int) -> GreedyAnswer:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": num_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/v1/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise ServerError(f"{url}: HTTP {error.code}: {error.read()[:300]!r}") from None
    choice = answer["choices"][0]
    tokens = tuple((choice.get("logprobs") or {}).get("tokens") or ())
    return GreedyAnswer(choice["text"], tokens, int(answer["usage"]["completion_tokens"]))


def agreed_tokens(reference: GreedyAnswer, text: str) -> int:
    """How many leading reference tokens `text` reproduces (by text: servers spell token strings
    differently, so only the reference's own split into tokens is used)."""
    if text == reference.text:
        return reference.num_tokens
    common = next(
        (i for i, (a, b) in enumerate(zip(reference.text, text, strict=False)) if a != b),
        min(len(reference.text), len(text)),
    )
    count, position = 0, 0
    for token in reference.tokens:
        position += len(token)
        if position > common:
            break
        count += 1
    return count


def is_garbage(text: str) -> bool:
    """Empty, blank, or mostly replacement / control characters."""
    if not text.strip():
        return True
    bad = sum(1 for c in text if c == "\ufffd" or (ord(c) < 32 and c not in "\n\t\r"))
    return bad * 2 >= len(text)


def check_greedy(
    label: str,
    answers: list[GreedyAnswer],
    reference_label: str,
    reference: list[GreedyAnswer],
    prompts: Sequence[str],
    num_tokens: int,
    min_agree: int,
) -> list[GreedyComparison]:
    """Compares a server's answers with the reference's; raises `GreedyMismatch` on empty or
    garbage text, a wrong token count (ignore_eos not honoured), or a mismatch within the first
    `min_agree` tokens. Later mismatches (float rounding at a near-tie) are returned, not raised."""
    comparisons = []
    for prompt, ref, answer in zip(prompts, reference, answers, strict=True):
        for who, got in ((reference_label, ref), (label, answer)):
            if is_garbage(got.text):
                raise GreedyMismatch(f"{who} answered {got.text!r} to {prompt!r}: empty or garbage")
            if got.num_tokens != num_tokens:
                raise GreedyMismatch(
                    f"{who} generated {got.num_tokens} tokens for {prompt!r}, not {num_tokens} "
                    "(does it honour ignore_eos?)"
                )
        comparison = GreedyComparison(label, prompt, ref, answer, agreed_tokens(ref, answer.text))
        if comparison.agreed_tokens < min(min_agree, num_tokens):
            raise GreedyMismatch(
                f"{label} and {reference_label} disagree at greedy token "
                f"{comparison.agreed_tokens + 1} of {prompt!r}: {answer.text!r} vs {ref.text!r} "
                "(the same weights at temperature 0 should give the same text: a peer that "
                "loaded the model wrongly?)"
            )
        comparisons.append(comparison)
    return comparisons


# -- SLO crossing and ratios


@dataclass(frozen=True, slots=True)
class SloThroughput:
    """The rate where latency crosses the SLO: `low` <= it <= `high` (equal when interpolated;
    `high` inf when the SLO was never crossed, `low` 0 when it was crossed at the lowest rate)."""

    low: float
    high: float

    def render(self) -> str:
        if self.low == self.high:
            return f"{self.low:.3g}"
        if math.isinf(self.high):
            return f"not reached, > {self.low:.3g}"
        return f"< {self.high:.3g}"


def slo_crossing(points: Sequence[tuple[float, float]], slo_s: float) -> SloThroughput:
    """From (rate, latency) points: the rate at which latency first rises past `slo_s`, linear
    between the last rate that met it and the first that did not."""
    ordered = sorted(p for p in points if not math.isnan(p[1]))
    if not ordered:
        return SloThroughput(0.0, math.inf)
    for i, (rate, latency) in enumerate(ordered):
        if latency > slo_s:
            if i == 0:
                return SloThroughput(0.0, rate)
            low_rate, low_latency = ordered[i - 1]
            fraction = (slo_s - low_latency) / (latency - low_latency)
            value = low_rate + fraction * (rate - low_rate)
            return SloThroughput(value, value)
    return SloThroughput(ordered[-1][0], math.inf)


def slo_ratio(numerator: SloThroughput, denominator: SloThroughput) -> str:
    """numerator / denominator, with bounds where either is only bounded."""
    if math.isinf(numerator.high) and math.isinf(denominator.high):
        return "- (neither crossed it)"
    if numerator.low == 0 and denominator.low == 0:
        return "- (both past it at the lowest rate)"
    low = numerator.low / denominator.high
    high = numerator.high / denominator.low if denominator.low > 0 else math.inf
    if low == high:
        return f"{low:.2f}x"
    return f">= {low:.2f}x" if math.isinf(high) else f"<= {high:.2f}x"


# -- the run


@dataclass(slots=True)
class Calibration:
    """What one server measured before the sweep."""

    label: str
    model: str  # the name it serves under
    version: str | None
    unloaded_per_token_latency_s: float
    unloaded_ttft_s: float
    capacity_tokens_per_s: float
    capacity_rps: float
    mean_prompt_tokens_server: float  # the server's own count of the unloaded prompts


@dataclass(slots=True)
class Run:
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    greedy: dict[str, list[GreedyAnswer]] = field(default_factory=dict)  # label -> per prompt
    comparisons: list[GreedyComparison] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    slo_s: float = math.nan
    results: dict[str, list[RunMetrics]] = field(default_factory=dict)
    chunks: dict[str, list[ChunkCounts]] = field(default_factory=dict)  # label -> per rate
    servers: dict[str, Server] = field(default_factory=dict)  # how each was started (last time)
    mean_prompt_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    vllm_version: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="what fastserve serves")
    parser.add_argument("--peer", choices=["vllm", "none"], default="vllm", help="peer to start")
    parser.add_argument("--peer-url", help="an OpenAI-compatible server already running instead")
    parser.add_argument("--peer-label", help="its name in the report (default vllm / peer)")
    parser.add_argument(
        "--fastserve-variant",
        action="append",
        default=[],
        metavar="LABEL:FLAGS",
        help="an extra FastServe run with these `up` flags, e.g. 'fcfs:--policy fcfs'",
    )
    parser.add_argument("--fastserve-flags", default="", help="`up` flags for every variant")
    parser.add_argument("--max-batch-size", type=int, default=16, help="both servers' cap")
    parser.add_argument("--max-batched-tokens", type=int, default=2048, help="both servers' cap")
    parser.add_argument("--max-model-len", type=int, help="vLLM's, and the workload's clip")
    parser.add_argument(
        "--kv-tokens",
        type=int,
        help="memory pressure: KV capacity in tokens for both (FastServe --kv-blocks, vLLM "
        "--num-gpu-blocks-override); default: each server's own pool",
    )
    parser.add_argument("--vllm-kv-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE GiB")
    parser.add_argument("--vllm-threads-bind", default="auto", help="VLLM_CPU_OMP_THREADS_BIND")
    parser.add_argument("--vllm-block-size", type=int, default=128, help="vLLM's CPU default")
    parser.add_argument("--vllm-args", default="", help="extra vLLM server flags")
    parser.add_argument("--vllm-spec", default=peer_servers.VLLM_SPEC, help="pip requirement")
    parser.add_argument("--vllm-venv", type=Path, default=peer_servers.VLLM_VENV)
    parser.add_argument("--dataset", choices=sorted(workload.DATASETS), default="sharegpt")
    parser.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson")
    parser.add_argument("--cv", type=float, default=1.0, help="Gamma arrivals: CV of the gaps")
    parser.add_argument("--scale", type=float, help="length factor (default 0.1; tiny 0.25)")
    parser.add_argument("--num-requests", type=int, default=100, help="per rate")
    parser.add_argument("--rates", help="requests/s, comma-separated (default: calibrated)")
    parser.add_argument(
        "--rate-fractions",
        default=",".join(map(str, DEFAULT_FRACTIONS)),
        help="of the slower server's capacity, when no --rates",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-factor", type=float, default=5.0, help="x better unloaded")
    parser.add_argument("--num-unloaded", type=int, default=8, help="sequential requests")
    parser.add_argument("--num-burst", type=int, help="capacity burst (default 4 x batch cap)")
    parser.add_argument("--check-tokens", type=int, default=16, help="greedy check length")
    parser.add_argument("--check-prompts", type=int, default=len(CHECK_PROMPTS))
    parser.add_argument("--min-agree", type=int, default=4, help="tokens that must match")
    parser.add_argument("--max-concurrency", type=int, default=loadgen.DEFAULT_MAX_CONCURRENCY)
    parser.add_argument("--name", help="report name (default peers-<model>-<dataset>-<peer>)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--log-dir", type=Path, default=peer_servers.CACHE / "logs")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv

    tiny = args.model == "tiny"
    args.model_label = "tiny" if tiny else Path(args.model).name.lower()
    args.scale = args.scale or (0.25 if tiny else 0.1)
    args.max_model_len = args.max_model_len or (512 if tiny else 2048)
    args.num_burst = args.num_burst or 4 * args.max_batch_size
    args.cv = args.cv if args.arrival == "gamma" else 1.0
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    args.fractions = [float(f) for f in args.rate_fractions.split(",")]
    if not 1 <= args.check_prompts <= len(CHECK_PROMPTS):
        parser.error(f"--check-prompts must be in [1, {len(CHECK_PROMPTS)}]")
    flags = [f"--max-batch-size={args.max_batch_size}"]
    flags.append(f"--max-batched-tokens={args.max_batched_tokens}")
    if args.kv_tokens is not None:
        if args.peer == "vllm" and not args.peer_url:  # the same room on both: whole vLLM blocks
            whole = peer_servers.kv_blocks(args.kv_tokens, args.vllm_block_size)
            args.kv_tokens = whole * args.vllm_block_size
        blocks = peer_servers.kv_blocks(args.kv_tokens, peer_servers.FASTSERVE_BLOCK_SIZE)
        flags.append(f"--kv-blocks={blocks}")
        # No request may need more KV than either server has (vLLM refuses to start if one
        # of --max-model-len tokens would not fit).
        args.max_model_len = min(args.max_model_len, args.kv_tokens)
    args.common_flags = [*flags, *shlex.split(args.fastserve_flags)]
    try:
        variants = [parse_variant(v) for v in args.fastserve_variant]
    except ValueError as error:
        parser.error(str(error))
    servers = [ServerSpec("fastserve", "fastserve"), *variants]
    if args.peer_url:
        servers.append(ServerSpec(args.peer_label or "peer", "url", url=args.peer_url))
    elif args.peer == "vllm":
        servers.append(ServerSpec(args.peer_label or "vllm", "vllm"))
    if len({s.label for s in servers}) != len(servers):
        parser.error("server labels must be distinct")
    args.servers = servers
    args.peer_spec = next((s for s in servers if not s.is_fastserve), None)
    pressure = "-pressure" if args.kv_tokens is not None else ""
    peer = args.peer_spec.label if args.peer_spec else "none"
    args.name = args.name or f"peers-{args.model_label}-{args.dataset}-{peer}{pressure}"
    return args


class Bench:
    """One run: starts, calibrates and sweeps each server in turn."""

    def __init__(self, args: argparse.Namespace, progress: tqdm) -> None:
        self.args = args
        self.progress = progress
        self.run = Run()
        if args.model == "tiny":
            from tests.tiny_model import tiny_llama_dir

            self.model: str | Path = tiny_llama_dir()
        else:
            self.model = args.model
        self.peer_folder: Path | None = None

    def say(self, text: str) -> None:
        self.progress.write(text, file=sys.stderr)

    def status(self, text: str) -> None:
        self.progress.set_description(text)

    def requests(self, rate_rps: float) -> list[workload.Request]:
        a = self.args
        shape = {"dataset": a.dataset, "arrival": a.arrival, "cv": a.cv, "scale": a.scale}
        return workload.make_workload(
            a.num_requests, rate_rps, max_context_tokens=a.max_model_len, seed=a.seed, **shape
        )

    def start(self, spec: ServerSpec) -> Server:
        a = self.args
        self.status(f"{spec.label}: starting")
        if spec.kind == "url":
            assert spec.url is not None
            server = peer_servers.attach(spec.label, spec.url)
        elif spec.kind == "fastserve":
            flags = [*a.common_flags, *spec.flags]
            server = peer_servers.start_fastserve(spec.label, self.model, flags, a.log_dir)
        else:
            if self.peer_folder is None:
                self.status(f"{spec.label}: preparing")
                self.run.vllm_version = peer_servers.ensure_vllm(
                    a.vllm_venv, a.vllm_spec, say=self.say
                )
                folder = peer_servers.fastserve_model_folder(self.model)
                self.peer_folder = peer_servers.peer_model_folder(folder)
                self.status(f"{spec.label}: starting")
            block_size, num_blocks = a.vllm_block_size, None
            if a.kv_tokens is not None:
                num_blocks = peer_servers.kv_blocks(a.kv_tokens, block_size)
                num_blocks += peer_servers.VLLM_NULL_BLOCKS
            server = peer_servers.start_vllm(
                spec.label,
                self.peer_folder,
                served_name=peer_servers.served_model_name(self.model),
                max_model_len=a.max_model_len,
                max_num_seqs=a.max_batch_size,
                max_batched_tokens=a.max_batched_tokens,
                kv_space_gib=a.vllm_kv_space,
                threads_bind=a.vllm_threads_bind,
                block_size=block_size,
                num_blocks=num_blocks,
                extra_args=shlex.split(a.vllm_args),
                log_dir=a.log_dir,
                venv=a.vllm_venv,
            )
        self.run.servers[spec.label] = server
        return server

    def average_request(self) -> workload.Request:
        requests = self.requests(1.0)
        self.run.mean_prompt_tokens, self.run.mean_output_tokens = workload.mean_lengths(requests)
        prompt = workload.make_prompt(
            round(self.run.mean_prompt_tokens), random.Random(self.args.seed)
        )
        return workload.Request(0.0, prompt, round(self.run.mean_output_tokens))

    def warm_up(self, server: Server, model: str) -> None:
        """3 short requests, then a full batch of average ones: first-call costs (vLLM compiles
        on its first request) stay out of the data."""
        self.status(f"{server.label}: warming up")
        run_replay(server.url, model, [SHORT_REQUEST] * 3, sequential=True)
        burst_tokens_per_s(server.url, model, self.average_request(), self.args.max_batch_size)

    def calibrate(self, spec: ServerSpec, server: Server) -> Calibration:
        a = self.args
        model, _ = peer_servers.served_model(server.url)
        self.status(f"{spec.label}: greedy check")
        prompts = CHECK_PROMPTS[: a.check_prompts]
        greedy = [greedy_answer(server.url, model, p, a.check_tokens) for p in prompts]
        self.run.greedy[spec.label] = greedy
        self.check_pending()
        self.warm_up(server, model)
        self.status(f"{spec.label}: unloaded latency")
        streams = run_replay(
            server.url, model, self.requests(1.0)[: a.num_unloaded], sequential=True
        )
        records = [s.record for s in streams]
        if errors := {r.error for r in records if not r.ok}:
            raise ServerError(f"{spec.label}: unloaded requests failed: {errors}")
        self.status(f"{spec.label}: capacity ({a.num_burst} at once)")
        capacity = burst_tokens_per_s(server.url, model, self.average_request(), a.num_burst)
        return Calibration(
            label=spec.label,
            model=model,
            version=peer_servers.server_version(server.url),
            unloaded_per_token_latency_s=metrics.mean([r.per_token_latency_s for r in records]),
            unloaded_ttft_s=metrics.mean([t for r in records if (t := r.ttft_s) is not None]),
            capacity_tokens_per_s=capacity,
            capacity_rps=capacity / self.run.mean_output_tokens,
            mean_prompt_tokens_server=metrics.mean([r.prompt_tokens for r in records]),
        )

    def check_pending(self) -> None:
        """Compares every server whose greedy answers are in with the reference (the first
        FastServe), once the reference's are in too."""
        a, run = self.args, self.run
        reference = a.servers[0].label
        if reference not in run.greedy:
            return
        done = {c.server for c in run.comparisons}
        prompts = CHECK_PROMPTS[: a.check_prompts]
        for label, answers in run.greedy.items():
            if label != reference and label not in done:
                run.comparisons += check_greedy(
                    label,
                    answers,
                    reference,
                    run.greedy[reference],
                    prompts,
                    a.check_tokens,
                    a.min_agree,
                )

    def sweep(self, spec: ServerSpec, server: Server) -> None:
        calibration = self.run.calibrations[spec.label]
        results, chunks = [], []

        def show(num_done: int, total: int) -> None:
            self.progress.set_postfix_str(f"{num_done}/{total} requests", refresh=False)
            self.progress.update(0)

        for rate in self.run.rates:
            self.status(f"{spec.label} @ {rate:.3g} req/s")
            streams = run_replay(
                server.url,
                calibration.model,
                self.requests(rate),
                max_concurrency=self.args.max_concurrency,
                on_progress=show,
            )
            records = [s.record for s in streams]
            point = metrics.summarize(records, rate, self.run.slo_s)
            if point.num_errors:
                first = next(r.error for r in records if not r.ok)
                self.say(f"{spec.label} @ {rate:.3g}: {point.num_errors} errors: {first}")
            results.append(point)
            chunks.append(chunk_counts(streams))
            self.progress.update(1)
        self.run.results[spec.label] = results
        self.run.chunks[spec.label] = chunks

    def execute(self) -> Run:
        """Calibrates every server in turn (one already running first; the last one stays up),
        fixes the rates and the SLO, then sweeps the last one first and starts the others
        again for their sweeps."""
        a, run = self.args, self.run
        self.average_request()
        specs = sorted(a.servers, key=lambda s: s.kind != "url")
        server: Server | None = None
        try:
            for i, spec in enumerate(specs):
                server = self.start(spec)
                run.calibrations[spec.label] = self.calibrate(spec, server)
                self.progress.update(1)
                if i < len(specs) - 1:
                    server.stop()
                    server = None
            calibrations = list(run.calibrations.values())
            slowest = min(calibrations, key=lambda c: c.capacity_rps)
            best = min(calibrations, key=lambda c: c.unloaded_per_token_latency_s)
            run.slo_s = a.slo_factor * best.unloaded_per_token_latency_s
            run.rates = a.rates or [float(f"{f * slowest.capacity_rps:.3g}") for f in a.fractions]
            for c in calibrations:
                self.say(
                    f"{c.label}: unloaded {ms(c.unloaded_per_token_latency_s)} ms/token, "
                    f"{c.capacity_tokens_per_s:.0f} tokens/s = {c.capacity_rps:.3g} req/s"
                )
            self.say(f"SLO {ms(run.slo_s)} ms/token; rates {run.rates} req/s")
            for spec in [specs[-1], *specs[:-1]]:
                if server is None:
                    server = self.start(spec)
                    self.warm_up(server, run.calibrations[spec.label].model)
                self.sweep(spec, server)
                server.stop()
                server = None
        finally:
            if server is not None:
                server.stop()
        # The report lists the servers in the order given.
        labels = [s.label for s in a.servers]
        run.calibrations = {k: run.calibrations[k] for k in labels}
        run.results = {k: run.results[k] for k in labels}
        run.chunks = {k: run.chunks[k] for k in labels}
        return run


# -- the report


def describe_server(run: Run, label: str) -> str:
    """How a server was run, for the report's header."""
    server = run.servers.get(label)
    calibration = run.calibrations.get(label)
    version = ""
    if calibration is not None and calibration.version:
        version = f" (server version {calibration.version})"
    if server is None or not server.command:
        return f"`{label}`: already running at {server.url if server else '?'}{version}"
    argv = [Path(server.command[0]).name, *server.command[1:]]
    env = [f"{k}={v}" for k, v in server.env.items() if k.startswith(("VLLM_CPU", "OMP"))]
    return f"`{label}`: `{shlex.join([*env, *argv])}`{version}"


def render_report(args: argparse.Namespace, run: Run, elapsed_s: float) -> str:
    peer = args.peer_spec.label if args.peer_spec else None
    fastserves = [s.label for s in args.servers if s.is_fastserve]
    arrival = args.arrival + (f" (CV {args.cv:g})" if args.arrival == "gamma" else "")
    calibrations = list(run.calibrations.values())
    best = min(calibrations, key=lambda c: c.unloaded_per_token_latency_s)
    slowest = min(calibrations, key=lambda c: c.capacity_rps)
    worst_lag_s = max((m.p99_send_lag_s for rs in run.results.values() for m in rs), default=0)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    if args.kv_tokens is None:
        memory = "no memory pressure: each server's default KV pool"
    else:
        memory = (
            f"memory pressure: KV for {args.kv_tokens} tokens on each (FastServe `--kv-blocks`; "
            f"vLLM `--num-gpu-blocks-override`, blocks of {args.vllm_block_size} plus its null "
            "block), requests clipped to that context"
        )
    rates_note = (
        "given by `--rates`"
        if args.rates
        else f"{', '.join(f'{f:g}' for f in args.fractions)} x the slower server's capacity "
        f"({slowest.label}, {slowest.capacity_rps:.3g} req/s)"
    )
    lines = [
        f"# FastServe vs {peer or 'nothing'}: {args.model_label}, {args.dataset}, {arrival}",
        "",
        f"Generated by `{shlex.join(['bench/peers.py', *args.argv])}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPU cores, in "
        f"{elapsed_s / 60:.1f} min. One server at a time; the same requests for every server.",
        "",
        f"- Model: `{args.model}`, float32, batch cap {args.max_batch_size} and "
        f"{args.max_batched_tokens} batched tokens on every server; {memory}.",
        *(f"- {describe_server(run, label)}" for label in run.calibrations),
        f"- FastServe's environment: OMP_NUM_THREADS={threads}.",
        f"- Workload: {args.num_requests} requests per rate, {args.dataset}-shaped lengths x "
        f"{args.scale:g} (mean prompt {run.mean_prompt_tokens:.0f}, mean output "
        f"{run.mean_output_tokens:.0f} tokens), {arrival} arrivals, seed {args.seed}; sent to "
        "`/v1/completions`, streamed, temperature 0, `ignore_eos` and `max_tokens` = the "
        "intended output length.",
        f"- Rates: {rates_note}: {', '.join(f'{r:.3g}' for r in run.rates)} req/s.",
        f"- SLO: {args.slo_factor:g}x the better unloaded per-token latency ({best.label}, "
        f"{ms(best.unloaded_per_token_latency_s)} ms) = {ms(run.slo_s)} ms per token.",
        f"- Client check: at every point, 99% of requests were sent within {ms(worst_lag_s)} ms "
        "of their arrival time.",
        "",
        "Per-token latency is job latency (arrival to last token) / output tokens; TTFT is "
        "arrival to the first chunk with text; TPOT the time per output token after the first. "
        "Latencies in ms; output tokens from each server's `usage`.",
        "",
        "## Calibration",
        "",
        f"Unloaded: {args.num_unloaded} workload requests one at a time. Saturated: "
        f"{args.num_burst} copies of an average request at once, after a warm-up.",
        "",
    ]
    rows = [
        [
            c.label,
            ms(c.unloaded_per_token_latency_s),
            ms(c.unloaded_ttft_s),
            f"{c.capacity_tokens_per_s:.0f}",
            f"{c.capacity_rps:.3g}",
            f"{c.mean_prompt_tokens_server:.1f}",
        ]
        for c in calibrations
    ]
    columns = ["server", "unloaded per-token", "unloaded TTFT", "saturated output tokens/s"]
    columns += ["capacity (req/s)", "prompt tokens (server's count, mean)"]
    lines += table(columns, rows)
    lines += ["", "## Results", ""]
    columns = ["server", "rate (req/s)", "mean per-token", "P95 per-token", "mean TTFT"]
    columns += ["P95 TTFT", "mean TPOT", "throughput (req/s)", "output tokens/s", "errors"]
    rows = []
    for label, runs in run.results.items():
        for m in runs:
            latencies = [m.mean_per_token_latency_s, m.p95_per_token_latency_s, m.mean_ttft_s]
            latencies += [m.p95_ttft_s, m.mean_tpot_s]
            rates = [f"{m.throughput_rps:.3g}", f"{m.throughput_tokens_per_s:.0f}"]
            rows.append(
                [label, f"{m.rate_rps:.3g}", *map(ms, latencies), *rates, str(m.num_errors)]
            )
    lines += table(columns, rows)
    slo = {label: slo_throughputs(runs, run.slo_s) for label, runs in run.results.items()}
    lines += [
        "",
        "## Throughput at the SLO",
        "",
        f"The rate at which per-token latency (mean, or P95) rises past the SLO ({ms(run.slo_s)} "
        "ms), interpolated linearly between the tested rates around the crossing.",
        "",
    ]
    rows = [[label, mean.render(), p95.render()] for label, (mean, p95) in slo.items()]
    lines += table(["server", "at the mean SLO (req/s)", "at the P95 SLO (req/s)"], rows)
    lines += ["", *render_ratios(run, fastserves, peer, slo)]
    lines += ["", *render_chunks(run)]
    lines += ["", *render_greedy(args, run)]
    lines += ["", "## Plots", "", f"![mean per-token latency]({args.name}-per-token-latency.png)"]
    lines += ["", f"![P95 per-token latency]({args.name}-p95.png)", ""]
    lines += [f"![throughput]({args.name}-throughput.png)", ""]
    return "\n".join(lines)


def slo_throughputs(runs: list[RunMetrics], slo_s: float) -> tuple[SloThroughput, SloThroughput]:
    """Throughput at the SLO on the mean and on the P95 per-token latency."""
    mean = slo_crossing([(m.rate_rps, m.mean_per_token_latency_s) for m in runs], slo_s)
    p95 = slo_crossing([(m.rate_rps, m.p95_per_token_latency_s) for m in runs], slo_s)
    return mean, p95


def render_ratios(
    run: Run,
    fastserves: list[str],
    peer: str | None,
    slo: dict[str, tuple[SloThroughput, SloThroughput]],
) -> list[str]:
    if peer is None or peer not in run.results:
        return ["## FastServe / peer", "", "No peer was run."]
    fastserves = [f for f in fastserves if f in run.results]
    lines = [
        f"## FastServe / {peer}",
        "",
        "Each FastServe run divided by the peer's. Latency: below 1x means FastServe is faster. "
        "Throughput: above 1x means FastServe serves more. `>=` / `<=` where a server never "
        "crossed the SLO within the tested rates (or crossed it below the lowest).",
        "",
    ]
    base = run.calibrations[peer]
    rows = []
    calib = [
        ("unloaded per-token latency", "unloaded_per_token_latency_s"),
        ("unloaded TTFT", "unloaded_ttft_s"),
        ("saturated output tokens/s", "capacity_tokens_per_s"),
    ]
    for name, attr in calib:
        values = [
            ratio(getattr(run.calibrations[f], attr), getattr(base, attr)) for f in fastserves
        ]
        rows.append([name, *values])
    for index, which in enumerate(["mean", "P95"]):
        values = [slo_ratio(slo[f][index], slo[peer][index]) for f in fastserves]
        rows.append([f"throughput at the {which} per-token SLO", *values])
    attrs = [
        ("mean per-token", "mean_per_token_latency_s"),
        ("P95 per-token", "p95_per_token_latency_s"),
        ("mean TTFT", "mean_ttft_s"),
    ]
    for i, rate in enumerate(run.rates):
        for name, attr in attrs:
            values = [
                ratio(getattr(run.results[f][i], attr), getattr(run.results[peer][i], attr))
                for f in fastserves
            ]
            rows.append([f"{name} at {rate:.3g} req/s", *values])
    return lines + table(["metric", *(f"{f} / {peer}" for f in fastserves)], rows)


def render_chunks(run: Run) -> list[str]:
    lines = [
        "## SSE chunks per stream",
        "",
        "SSE chunks (events with a choice; not the usage-only one) against output tokens "
        "(`usage`), per stream. One chunk per token lets a client time every token; fewer "
        "chunks than tokens means tokens were merged (or a token's text was held back and sent "
        "with the next one: an incomplete UTF-8 character).",
        "",
    ]
    columns = ["server", "rate (req/s)", "streams", "output tokens", "chunks", "with text"]
    columns += ["streams with fewer chunks than tokens", "with more", "tokens per chunk"]
    rows = []
    for label, per_rate in run.chunks.items():
        total = sum(per_rate, ChunkCounts())
        points = [(f"{r:.3g}", c) for r, c in zip(run.rates, per_rate, strict=True)]
        for rate, c in [*points, ("all", total)]:
            per_chunk = f"{c.tokens / c.chunks:.3f}" if c.chunks else "-"
            counts = [c.streams, c.tokens, c.chunks, c.text_chunks, c.fewer, c.more]
            rows.append([label, rate, *map(str, counts), per_chunk])
    return lines + table(columns, rows)


def render_greedy(args: argparse.Namespace, run: Run) -> list[str]:
    reference = args.servers[0].label
    lines = [
        "## Greedy check",
        "",
        f"{args.check_prompts} prompts, {args.check_tokens} tokens at temperature 0 with "
        f"`ignore_eos`, each server against `{reference}`; a run stops when a server disagrees "
        f"within the first {args.min_agree} tokens or answers empty text.",
        "",
    ]
    rows = []
    for c in run.comparisons:
        agreed = "all" if c.identical else f"first {c.agreed_tokens}"
        text = "same" if c.identical else f"{c.answer.text!r} vs {c.reference.text!r}"
        rows.append([c.server, repr(c.prompt), agreed, text.replace("|", "\\|")])
    if not rows:
        return [*lines, "Only one server ran."]
    return lines + table(["server", "prompt", "tokens that agree", "text"], rows)


def plot_throughput(path: Path, run: Run, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in run.results.items():
        rates = [m.rate_rps for m in runs]
        ax.plot(rates, [m.throughput_tokens_per_s for m in runs], marker="o", label=label)
    offered = [r * run.mean_output_tokens for r in run.rates]
    ax.plot(run.rates, offered, color="grey", linestyle=":", label="offered")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(args: argparse.Namespace, run: Run, elapsed_s: float) -> str:
    args.out.mkdir(parents=True, exist_ok=True)
    report = render_report(args, run, elapsed_s)
    (args.out / f"{args.name}.md").write_text(report)
    sweep = Sweep(run.rates, dict(run.results))
    slo_line = (run.slo_s, f"SLO ({args.slo_factor:g}x better unloaded)")
    what = f"({args.model_label}, {args.dataset}, {args.arrival})"
    plot(
        args.out / f"{args.name}-per-token-latency.png",
        sweep,
        "mean_per_token_latency_s",
        f"Mean per-token latency {what}",
        slo_line,
    )
    plot(
        args.out / f"{args.name}-p95.png",
        sweep,
        "p95_per_token_latency_s",
        f"P95 per-token latency {what}",
        slo_line,
    )
    plot_throughput(args.out / f"{args.name}-throughput.png", run, f"Throughput {what}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    num_rates = len(args.rates) if args.rates else len(args.fractions)
    redraw_s = 0.1 if sys.stderr.isatty() else 10.0  # a log file gets fewer lines
    total = len(args.servers) * (1 + num_rates)
    with tqdm(total=total, unit="step", mininterval=redraw_s) as progress:
        bench = Bench(args, progress)
        try:
            run = bench.execute()
        except (GreedyMismatch, ServerError) as error:
            progress.close()
            kind = "greedy check failed" if isinstance(error, GreedyMismatch) else "server failed"
            print(f"bench/peers.py: {kind}: {error}", file=sys.stderr)
            return 1
    elapsed_s = time.perf_counter() - started
    report = write_outputs(args, run, elapsed_s)
    print(report)
    print(f"wrote {args.out / args.name}.md and 3 plots in {elapsed_s:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
