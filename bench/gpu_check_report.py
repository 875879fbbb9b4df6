"""The report of `bench.gpu_check`: each step's outcome, the issue's targets judged on a GPU
run, and the markdown page written beside the JSON."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from bench.gpu_check_run import Outcome

TODAY_STACK_TOKENS_PER_S = 1146.0  # the issue's H200 run, 1B shape, 64 x 128


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def find(outcomes: Sequence[Outcome], name: str) -> Outcome | None:
    return next((o for o in outcomes if o.name == name), None)


Measure = Callable[[Outcome], tuple[str, bool] | None]


def evaluate_targets(outcomes: Sequence[Outcome], gpu: bool) -> list[dict[str, str]]:
    """The issue's targets: what this run measured for each, and whether it was met."""
    targets: list[dict[str, str]] = []

    def add(target: str, step: str, measure: Measure) -> None:
        outcome = find(outcomes, step)
        if not gpu:
            targets.append({"target": target, "measured": "-", "status": "unmeasured (CPU run)"})
            return
        if outcome is None or outcome.status not in ("ok", "failed"):
            why = "step not run" if outcome is None else f"step {outcome.status}"
            targets.append({"target": target, "measured": "-", "status": f"unmeasured ({why})"})
            return
        measured = measure(outcome)
        if measured is None:
            targets.append({"target": target, "measured": "-", "status": "unmeasured"})
            return
        text, met = measured
        targets.append({"target": target, "measured": text, "status": "met" if met else "not met"})

    def decode_ratio(shape: str, batches: tuple[int, ...], limit: float) -> Measure:
        def measure(outcome: Outcome) -> tuple[str, bool] | None:
            rows = {
                r["batch"]: r["ours_over_bound"]
                for r in outcome.result.get("rows", [])
                if r["shape"] == shape
            }
            if not all(b in rows for b in batches):
                return None
            text = ", ".join(f"batch {b}: {rows[b]:.1f}x" for b in batches)
            return text, all(rows[b] <= limit for b in batches)

        return measure

    def stack_value(key: str, fmt: str, ok: Callable[[float], bool]) -> Measure:
        def measure(outcome: Outcome) -> tuple[str, bool] | None:
            value = outcome.result.get(key)
            if value is None:
                return None
            return fmt.format(value), ok(float(value))

        return measure

    def swap_ratio(outcome: Outcome) -> tuple[str, bool] | None:
        worst = outcome.result.get("worst_ratio_at_4mib_or_more")
        if worst is None:
            return None
        return f"worst {100 * worst:.0f}% of the pinned copies", worst >= 0.5

    goal = 10 * TODAY_STACK_TOKENS_PER_S
    add("8B decode step <= 1.5x the bound at batch 1 and 16", "decode",
        decode_ratio("8B", (1, 16), 1.5))  # fmt: skip
    add("1B decode step <= 3x the bound at batch 16 and 64", "decode",
        decode_ratio("1B", (16, 64), 3.0))  # fmt: skip
    add(f"stack, 1B, 64 x 128 tokens: >= {goal:,.0f} output tokens/s", "stack-1b",
        stack_value("output_tokens_per_s", "{:,.0f} tokens/s", lambda v: v >= goal))  # fmt: skip
    add("control-plane share of an iteration <= 5% at 8B, batch 16", "stack-8b",
        stack_value("control_plane_share", "{:.1%}", lambda v: v <= 0.05))  # fmt: skip
    add("swaps of 4 MiB or more at >= 50% of the pinned copy bandwidth", "swap", swap_ratio)
    add("1B ready <= 15 s (here: `fastserve up` to ready, an upper bound)", "stack-1b",
        stack_value("ready_s", "{:.1f} s", lambda v: v <= 15))  # fmt: skip
    return targets


def fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    outcomes = [Outcome(**o) for o in report["steps"]]
    env = (find(outcomes, "env") or Outcome("env", "", "not run", 0, 0, None)).result
    gpu = report["mode"] == "cuda"
    lines = [f"# GPU check: {report['device']}, {report['date']}", ""]
    if not gpu:
        lines += [
            "**This is a CPU run of the harness, not a GPU measurement**: the same command at "
            "tiny sizes in float32 (`--device cpu`), to show that every step runs and reports. "
            "No GPU target of issue 15 is measured by it; the numbers below say nothing about "
            "a GPU.",
            "",
        ]
    lines += [
        f"- Command: `{report['command']}`; mode {report['mode']}"
        + (" (quick)" if report["quick"] else "")
        + f"; total {report['total_seconds']:.0f} s of a {report['budget_s']:.0f} s budget.",
        f"- Device: {report['device']}"
        + (f" ({env.get('device_memory_gib')} GiB)" if env.get("device_memory_gib") else "")
        + f"; {env.get('device_count', 0)} CUDA device(s); CPU {env.get('cpu', '-')} x "
        f"{env.get('cpu_count', '-')}.",
        f"- torch {env.get('torch', '-')}, CUDA {env.get('torch_cuda') or '-'}, transformers "
        f"{(env.get('wheels') or {}).get('transformers', '-')}, Python {env.get('python', '-')}; "
        f"commit {env.get('commit', '-')}" + (" (with local changes)" if env.get("dirty") else ""),
        "",
        "## Steps",
        "",
        "Each step ran as its own process under its own wall-clock limit.",
        "",
        "| step | status | seconds | limit s | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        summary = o.summary.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {o.name}: {o.title} | {o.status} | {o.seconds:.1f} | {o.limit_s:.0f} | {summary} |"
        )
    decode = find(outcomes, "decode")
    if decode is not None and decode.result.get("rows"):
        r = decode.result
        lines += [
            "",
            "## One decode step",
            "",
            f"{r.get('dtype')}"
            + (f", {r['threads']} CPU thread" if r.get("threads") else "")
            + f", context {r['rows'][0]['context']}, vocabulary 8,192, random "
            f"weights drawn on the device; lowest of 3 medians of {r.get('repeats')} steps each, "
            f"after {r.get('warmup', 5)} warm-ups. "
            "Ours: the worker's ModelRunner on its paged pool; transformers: eager, its default "
            "attention, a DynamicCache of the same context; both sample greedily to the host. "
            f"Bound: (weight bytes + KV bytes read) / the measured copy bandwidth, "
            f"{r['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (bytes read + written by one "
            f"{r['copy_bytes'] >> 20} MiB copy).",
            "",
            "Ours replays the step's CUDA graph where the worker would (a GPU); ours eager is the "
            "same step launched op by op. Attention backend: "
            f"{r['rows'][0].get('attention', 'n/a')}.",
            "",
            "| shape, batch | ours ms | ours eager ms | transformers ms | bound ms | ours / bound "
            "| ours / transformers |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['shape']}, batch {row['batch']} | {row['ours_ms']:.2f} | "
                f"{fmt(row.get('eager_ms'))} | {fmt(row.get('hf_ms'))} | {row['bound_ms']:.3f} | "
                f"{row['ours_over_bound']:.1f}x | {fmt(row.get('ours_over_hf'))}x |"
            )
        captures = {row["shape"]: row.get("graph_capture_s") for row in r["rows"]}
        if any(v is not None for v in captures.values()):
            lines.append("")
            lines.append(
                "Graph capture at start: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in captures.items() if v is not None)
                + "."
            )
    stacks = [o for o in outcomes if o.name.startswith("stack-") and "shape" in o.result]
    if stacks:
        lines += [
            "",
            "## The whole stack",
            "",
            "`fastserve up` (fcfs, --max-batch-size = the concurrency), all requests at once over "
            "streamed /v1/completions with token-id prompts, temperature 0, EOS ignored; one "
            "warm-up request first. Iteration and forward: the scheduler's Stats means over its "
            "last 1,000 iterations; control plane = (iteration - forward) / iteration.",
            "",
            "| run | ready s | output tokens/s | TTFT mean s | TTFT P50 s | per-token latency "
            "mean ms | TPOT mean ms | iteration ms | forward ms | control plane | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for o in stacks:
            s = o.result
            share = s.get("control_plane_share")
            per_token = s.get("per_token_latency_mean_s")
            tpot = s.get("tpot_mean_s")
            lines.append(
                f"| {s['shape']}, {s['concurrency']} x {s['output_tokens']} (prompt "
                f"{s['prompt_tokens']}) | {s['ready_s']:.1f} | {s['output_tokens_per_s']:.0f} | "
                f"{fmt(s.get('ttft_mean_s'), '.3f')} | {fmt(s.get('ttft_p50_s'), '.3f')} | "
                f"{fmt(None if per_token is None else 1e3 * per_token)} | "
                f"{fmt(None if tpot is None else 1e3 * tpot)} | "
                f"{1e3 * s['mean_iteration_seconds']:.2f} | "
                f"{1e3 * s['mean_forward_seconds']:.2f} | "
                f"{'-' if share is None else f'{share:.1%}'} | {s['errors']} |"
            )
    swap = find(outcomes, "swap")
    if swap is not None and swap.result.get("rows"):
        pinned = "pinned " if swap.result.get("pinned") else ""
        lines += [
            "",
            "## Swap bandwidth",
            "",
            f"The worker's Swapper through a kvstore process (shared memory, same host), timed "
            f"from the command to the reported completion, against plain {pinned}copies of the "
            f"same bytes between the pool and a host buffer allocated once; median of "
            f"{swap.result.get('rounds')} rounds after one warm-up.",
            "",
            "| MiB | swap out GB/s | swap in GB/s | copy out GB/s | copy in GB/s | out / copy | "
            "in / copy |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in swap.result["rows"]:
            lines.append(
                f"| {row['mib']:.1f} | {row['swap_out_gbps']:.2f} | {row['swap_in_gbps']:.2f} | "
                f"{row['copy_out_gbps']:.2f} | {row['copy_in_gbps']:.2f} | "
                f"{row['out_ratio']:.0%} | {row['in_ratio']:.0%} |"
            )
    lines += [
        "",
        "## Targets of issue 15",
        "",
        "| target | measured | status |",
        "| --- | --- | --- |",
    ]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['measured']} | {target['status']} |")
    wheels = env.get("wheels") or {}
    lines += [
        "",
        "## Running it on an offline GPU machine",
        "",
        "Run from a source tree with the generated gRPC code (`make proto` writes `gen/`), in a "
        "Python environment that has a CUDA build of torch, transformers, pytest, aiohttp and "
        "these wheels, which must be carried there (the machine has no network):",
        "",
        *[f"- {wheel}" for wheel in report["wheels_to_carry"]],
        "",
        "Found here: "
        + ", ".join(f"{name} {version or 'MISSING'}" for name, version in wheels.items())
        + ("; generated code present." if env.get("generated_code") else "; NO generated code."),
        "",
        "Then `make gpu-check` (or `.venv/bin/python -m bench.gpu_check`): at most "
        f"{report['budget_s']:.0f} s, each step under its own limit.",
    ]
    failed = [o for o in outcomes if o.status in ("failed", "timed out", "crashed")]
    for o in failed:
        lines += ["", f"### Output of {o.name} ({o.status})", "", "```", o.output_tail.strip()]
        lines += ["```"]
    return "\n".join(lines) + "\n"
