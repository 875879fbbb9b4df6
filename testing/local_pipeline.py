"""The scheduler's pipeline without processes: Executors in this process instead of workers
behind gRPC, with the interface the Engine uses (services/scheduler/pipeline.py's Pipeline).

Each Decision becomes the worker's command dataclasses (`worker_command`, the in-process twin of
services/scheduler/convert.py's decision_to_command) and goes to `Executor.run` on every stage,
exactly as a worker's server would apply it. Each stage runs its commands in order on its own
thread, so S stages hold up to S decisions in flight and pass activations to each other by gloo
as the worker processes do (their StageGroups share one rendezvous address).
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from services.common.model_source import max_model_len
from services.scheduler.core import Decision, SchedulerCore, SwapResult
from services.scheduler.pipeline import Pipeline, StageJoin, StageResult, StageTally, StepResult
from services.scheduler.worker_link import WorkerError, WorkerInfo
from services.worker.batch import SeqChunk
from services.worker.command import BlockMove, Command, CommandResult, Reset, Step
from services.worker.executor import Executor


def worker_command(decision: Decision) -> Command:
    """What a worker gets for a decision: the chunks as SeqChunks, each job's sampling settings
    only where the decision carries them (None: the worker holds them)."""
    return Command(
        action=Step(
            [
                SeqChunk(
                    c.job_id,
                    c.token_ids,
                    c.start_pos,
                    c.block_ids,
                    c.sample,
                    c.sampling,
                    c.from_last_sample,
                )
                for c in decision.chunks
            ]
        ),
        free_first=decision.free_job_ids,
        swap_out=[BlockMove(m.job_id, m.block_ids) for m in decision.swap_out],
        swap_in=[BlockMove(m.job_id, m.block_ids) for m in decision.swap_in],
    )


def swap_results(result: CommandResult) -> list[SwapResult]:
    """A stage's finished swaps, as the scheduler core takes them."""
    return [
        SwapResult(d.job_id, d.swap_in, d.ok, d.num_bytes, d.duration_s) for d in result.swaps_done
    ]


def stage_result(result: CommandResult) -> StageResult:
    return StageResult(
        tokens=dict(result.tokens),
        logprobs=dict(result.logprobs),
        forward_s=result.forward_s,
        wait_s=result.wait_s,
        total_s=result.total_s,
        num_used_blocks=result.num_used_blocks,
        swaps_done=swap_results(result),
        num_swaps_in_flight=result.num_swaps_in_flight,
    )


def executor_info(executor: Executor, stage_index: int = 0, num_stages: int = 1) -> WorkerInfo:
    """What the stage's worker would answer to Info."""
    runner = executor.runner
    config = runner.config
    return WorkerInfo(
        model_name="local",
        num_blocks=runner.num_blocks,
        block_size=runner.block_size,
        max_model_len=max_model_len(config),
        device=str(runner.device),
        dtype=str(runner.kv_cache.dtype).removeprefix("torch."),
        vocab_size=config.vocab_size,
        block_bytes=runner.block_bytes,
        swap_enabled=executor.swapper is not None,
        stage_index=stage_index,
        num_stages=num_stages,
        first_layer=runner.layers.start,
        num_layers=len(runner.layers),
        num_total_layers=config.num_hidden_layers,
    )


@dataclass(frozen=True, slots=True)
class LocalLink:
    """Stands in for a WorkerLink where the Engine only reads the address."""

    address: str


class LocalPipeline:
    """`executors`: one per stage, in stage order (several stages need StageGroups)."""

    def __init__(self, executors: Sequence[Executor]) -> None:
        if not executors:
            raise ValueError("a pipeline needs at least one stage")
        self.executors = list(executors)
        self.links = [LocalLink(f"local:{i}") for i in range(len(self.executors))]
        num_stages = len(self.executors)
        self.stages = [executor_info(e, i, num_stages) for i, e in enumerate(self.executors)]
        self._join = StageJoin(num_stages)
        self._threads: list[ThreadPoolExecutor] = []
        self._in_flight: deque[list[Future[CommandResult]]] = deque()
        self.stage_results: list[CommandResult] = []  # each stage's, of the last collected

    @property
    def num_stages(self) -> int:
        return len(self.executors)

    @property
    def tallies(self) -> list[StageTally]:
        return self._join.tallies

    @property
    def addresses(self) -> list[str]:
        return [link.address for link in self.links]

    def wait_for_info(self, timeout_s: float = 0.0) -> WorkerInfo:
        return Pipeline.check_layout(self.stages)

    def open(self) -> None:
        """Resets every stage (several stages form a new group); commands in flight finish
        and their results are dropped."""
        self._drain()
        if not self._threads:
            self._threads = [
                ThreadPoolExecutor(1, thread_name_prefix=f"stage{i}")
                for i in range(self.num_stages)
            ]
        self._join.forget_swaps()
        pipeline_id = uuid.uuid4().hex if self.num_stages > 1 else ""
        # Every stage at once: forming the group needs all of them.
        self._wait(self._send(Command(action=Reset(pipeline_id))))

    def submit(self, decision: Decision) -> None:
        """Starts the decision on every stage; its result comes from `collect`, in order."""
        if not self._threads:
            raise WorkerError("the local pipeline is not open")
        self._in_flight.append(self._send(worker_command(decision)))

    def collect(self) -> StepResult:
        """The result of the oldest decision submitted and not yet collected."""
        if not self._in_flight:
            raise RuntimeError("collect() with nothing submitted")
        self.stage_results = self._wait(self._in_flight.popleft())
        return self._join.join([stage_result(r) for r in self.stage_results])

    def execute(self, decision: Decision) -> StepResult:
        """One decision, start to end (nothing else in flight)."""
        self.submit(decision)
        return self.collect()

    def close(self) -> None:
        self._drain()
        for thread in self._threads:
            thread.shutdown(wait=True)
        self._threads = []

    def _send(self, command: Command) -> list[Future[CommandResult]]:
        return [
            thread.submit(executor.run, command)
            for thread, executor in zip(self._threads, self.executors, strict=True)
        ]

    def _wait(self, futures: list[Future[CommandResult]]) -> list[CommandResult]:
        results = [future.result() for future in futures]
        for index, result in enumerate(results):
            if result.error:
                raise WorkerError(f"stage {index}: {result.error}")
        return results

    def _drain(self) -> None:
        while self._in_flight:
            for future in self._in_flight.popleft():
                future.result()


def run_to_end(
    core: SchedulerCore,
    pipeline: LocalPipeline,
    on_step: Callable[[Decision, StepResult], None] | None = None,
    timeout_s: float = 300.0,
) -> dict[str, list[int]]:
    """Schedules and executes until the core has no work (decisions one at a time, finished
    swaps passed back); returns each job's output tokens. `on_step` sees every step."""
    outputs: dict[str, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    while core.has_work():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the core still had work after {timeout_s} s")
        decision = core.schedule()
        if decision.is_empty:
            time.sleep(0.002)  # waiting for swaps; an empty decision still reports them
        result = pipeline.execute(decision)
        if on_step is not None:
            on_step(decision, result)
        for event in core.update(decision, result.tokens, result.swaps_done):
            outputs.setdefault(event.job_id, []).extend(event.token_ids)
    return outputs
