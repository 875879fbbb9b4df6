"""Pipeline stages in one process: one Executor per stage, each in its own thread with its own
copy of the model and its own KV pool, activations passed by gloo point-to-point. Driven by the
scheduler core with a shuffling policy (preemption at every token, recompute when blocks run
short); greedy output must equal transformers' whole-model output."""

from __future__ import annotations

import threading

import pytest
import torch

from services.common.sampling import GREEDY
from services.worker.batch import SeqChunk
from services.worker.command import Command, Step
from services.worker.executor import Executor
from services.worker.model_runner import ModelRunner
from services.worker.pipeline import StageDeviceError, StageGroup, first_shared_device
from services.worker.stage_layout import parse_layer_split, split_layers
from testing.local_pipeline import LocalPipeline, run_to_end
from testing.oracle import assert_greedy_matches, hf_greedy
from testing.shuffling_policy import shuffled_core, stage_prompts
from testing.stack import free_port


def test_even_split_puts_the_remainder_first_and_explicit_splits_are_checked():
    assert split_layers(30, 1) == [range(0, 30)]
    assert split_layers(30, 4) == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert split_layers(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    with pytest.raises(ValueError, match="add up"):
        split_layers(4, 2, [1, 2])
    with pytest.raises(ValueError, match="names 3 stages"):
        split_layers(4, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="exceeds"):
        split_layers(4, 5)
    assert parse_layer_split("") is None and parse_layer_split("1,3") == [1, 3]
    with pytest.raises(ValueError, match="--layer-split"):
        parse_layer_split("1;3")


def make_stages(model, layer_split: list[int], num_blocks: int, block_size: int):
    ranges = split_layers(model.config.num_hidden_layers, len(layer_split), layer_split)
    rendezvous = f"127.0.0.1:{free_port()}"
    executors = []
    for index, layers in enumerate(ranges):
        runner = ModelRunner(model, num_blocks=num_blocks, block_size=block_size, layers=layers)
        group = StageGroup(index, len(ranges), rendezvous, device=torch.device("cpu"), timeout_s=30)
        executors.append(Executor(runner, stages=group))
    return executors


@pytest.mark.parametrize("layer_split", [[2, 2], [1, 2, 1]])
def test_stages_give_the_whole_models_greedy_output(tiny_hf_model, tiny_tokenizer, layer_split):
    block_size, num_blocks = 16, 6
    pipeline = LocalPipeline(make_stages(tiny_hf_model, layer_split, num_blocks, block_size))
    pipeline.open()  # the stages form their group
    core, jobs = shuffled_core(
        tiny_tokenizer, stage_prompts("Stage test"), seed=len(layer_split),
        max_batched_tokens=48, num_blocks=num_blocks, block_size=block_size,
    )  # fmt: skip
    waits = []

    def check_stages(decision, result):
        results = pipeline.stage_results
        assert all(not r.tokens for r in results[:-1]), "only the last stage samples"
        waits.append([r.wait_s for r in results])

    outputs = run_to_end(core, pipeline, check_stages)
    pipeline.close()
    assert core.counters.num_recomputed_jobs > 0  # the pool is small enough to force recompute
    assert all(w[0] == 0.0 for w in waits)  # stage 0 never waits for activations
    for job in jobs:
        ref = hf_greedy(tiny_hf_model, job.prompt_token_ids, job.max_tokens)
        assert_greedy_matches(tiny_hf_model, job.prompt_token_ids, outputs[job.job_id], ref)


def test_a_stage_sheds_the_weights_it_never_runs(tiny_hf_model):
    executors = make_stages(tiny_hf_model, [1, 2, 1], num_blocks=4, block_size=16)
    first, middle, last = (e.runner.model for e in executors)
    assert first.embed_tokens is not None and first.lm_head is None
    assert middle.embed_tokens is None and middle.lm_head is None
    assert last.embed_tokens is None and last.lm_head is not None
    assert [len(m.layers) for m in (first, middle, last)] == [1, 2, 1]
    assert middle.layer_range == range(1, 3)
    assert [m.layer_range for m in (first, middle, last)] == [range(0, 1), range(1, 3), range(3, 4)]
    # Each stage's KV pool holds only its own layers.
    assert [e.runner.kv_cache.block_bytes for e in executors] == [
        executors[0].runner.kv_cache.block_bytes * n for n in (1, 2, 1)
    ]


def test_a_step_before_the_group_is_formed_is_refused(tiny_hf_model):
    executors = make_stages(tiny_hf_model, [2, 2], num_blocks=4, block_size=16)
    chunk = SeqChunk("j", [5, 6], 0, [0], True, GREEDY)
    refused = executors[0].run(Command(action=Step([chunk])))
    assert "not formed" in refused.error and not refused.tokens


def test_two_stages_on_one_device_are_refused_with_nccl_saying_why():
    """NCCL cannot run two ranks on one GPU, and its own error does not say so. The stages
    tell each other their device before the group forms (over the real store): on CPU both
    are "this host's cpu", which stands in for one shared GPU."""
    assert first_shared_device(["a/gpu-0", "a/gpu-1", "b/gpu-0"]) is None
    assert first_shared_device(["a/gpu-0", "a/gpu-1", "a/gpu-0"]) == (0, 2)
    rendezvous = f"127.0.0.1:{free_port()}"
    stages = [
        StageGroup(i, 2, rendezvous, device=torch.device("cpu"), backend="nccl", timeout_s=20)
        for i in range(2)
    ]
    errors: list[BaseException] = []

    def form(stage: StageGroup) -> None:
        try:
            stage.form("one-gpu")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=form, args=(stage,)) for stage in stages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 2 and all(isinstance(e, StageDeviceError) for e in errors)
    assert "stages 0 and 1" in str(errors[0]) and "--pipeline-backend gloo" in str(errors[0])
    for stage in stages:
        stage.close()
