"""The nccl step of `bench.gpu_check`: two pipeline stages over NCCL when two GPUs are present."""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.gpu_check_common import Result


def run_two_stages(devices: list[str], backend: str) -> Result:
    """Two pipeline stages in this process (one thread each, as testing/local_pipeline.py runs
    them), each on its own device, activations over `backend`; a shuffling policy preempts at
    every iteration; greedy output compared with transformers on the CPU."""
    import copy

    import torch

    from services.common.model_source import load_model, load_tokenizer, resolve_model
    from services.worker.executor import Executor
    from services.worker.model_runner import ModelRunner
    from services.worker.pipeline import StageGroup
    from services.worker.stage_layout import split_layers
    from testing.local_pipeline import LocalPipeline, run_to_end
    from testing.oracle import assert_greedy_matches, hf_greedy
    from testing.shuffling_policy import shuffled_core, stage_prompts
    from testing.stack import free_port
    from testing.tiny_model import tiny_llama_dir

    source = resolve_model(str(tiny_llama_dir()))
    reference = load_model(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    block_size, num_blocks = 16, 12
    ranges = split_layers(reference.config.num_hidden_layers, 2)
    rendezvous = f"127.0.0.1:{free_port()}"
    executors = []
    for index, (layers, device) in enumerate(zip(ranges, devices, strict=True)):
        model = copy.deepcopy(reference).to(device)
        runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, layers=layers)
        group = StageGroup(
            index, 2, rendezvous, device=torch.device(device), backend=backend, timeout_s=60
        )
        executors.append(Executor(runner, stages=group))
    pipeline = LocalPipeline(executors)
    started = time.perf_counter()
    pipeline.open()
    core, jobs = shuffled_core(
        tokenizer, stage_prompts("Stage check"), seed=1, max_batched_tokens=48,
        num_blocks=num_blocks, block_size=block_size,
    )  # fmt: skip
    iterations = 0

    def count(decision: Any, result: Any) -> None:
        nonlocal iterations
        iterations += 1

    try:
        outputs = run_to_end(core, pipeline, count)
    finally:
        pipeline.close()
    elapsed = time.perf_counter() - started
    mismatches = []
    for job in jobs:
        ref = hf_greedy(reference, job.prompt_token_ids, job.max_tokens)
        try:
            assert_greedy_matches(reference, job.prompt_token_ids, outputs.get(job.job_id, []), ref)
        except AssertionError as error:
            mismatches.append(str(error).splitlines()[0])
    return {
        "status": "ok" if not mismatches else "failed",
        "reason": "; ".join(mismatches[:2]),
        "devices": devices,
        "backend": backend,
        "iterations": iterations,
        "seconds": elapsed,
        "jobs": len(jobs),
        "mismatches": mismatches,
        "summary": (
            f"2 stages on {', '.join(devices)} over {backend}: {len(jobs) - len(mismatches)}/"
            f"{len(jobs)} jobs match transformers, {iterations} iterations in {elapsed:.1f} s"
        ),
    }


def step_nccl(args: argparse.Namespace) -> Result:
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device", "summary": "no CUDA device"}
    count = torch.cuda.device_count()
    if count < 2:
        reason = f"{count} GPU: NCCL refuses two pipeline ranks on one device; needs two GPUs"
        return {"status": "skipped", "reason": reason, "summary": reason}
    return run_two_stages(["cuda:0", "cuda:1"], "nccl")
