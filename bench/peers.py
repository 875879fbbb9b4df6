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

    .venv/bin/python -m bench.peers [--num-requests 100] [--fastserve-variant fcfs:--policy fcfs]
    .venv/bin/python -m bench.peers --peer-url http://127.0.0.1:8000 --peer-label my-server
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bench import loadgen, metrics, multiturn, peer_servers, workload
from bench.peer_check import GreedyMismatch, check_greedy, greedy_answer
from bench.peer_client import burst_tokens_per_s, chunk_counts, run_replay
from bench.peer_report import Calibration, Run, write_outputs
from bench.peer_servers import Server, ServerError
from bench.policies import ms

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
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
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
            from testing.tiny_model import tiny_llama_dir

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Multi-turn chat is another shape of run, with its own flags: FastServe against vLLM.
    if (code := multiturn.handoff(argv, "bench.peers", peer="vllm")) is not None:
        return code
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
            print(f"bench.peers: {kind}: {error}", file=sys.stderr)
            return 1
    elapsed_s = time.perf_counter() - started
    report = write_outputs(args, run, elapsed_s)
    print(report)
    print(f"wrote {args.out / args.name}.md and 3 plots in {elapsed_s:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
