"""The scheduler's side of the pipeline: one WorkerLink per stage, every command sent to every
stage in the same order, up to S commands in flight, tokens taken from the last stage.

With one stage this is a thin wrapper over its WorkerLink. With S stages, each Reset names a
new pipeline id under which the stages (re)form their activation group, so a stage that
restarted joins a fresh group with the others.

The engine's in-flight ledger is the only one: `collect` receives the next result, in order,
from every link. `StageJoin` merges the stages' results into one StepResult; an in-process
pipeline (testing/local_pipeline.py) shares it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from fastserve.worker.v1 import worker_pb2 as wpb
from services.scheduler.convert import decision_to_command, logprobs_from_pb
from services.scheduler.core import Decision, SwapResult, TokenLogprobs
from services.scheduler.worker_link import WorkerError, WorkerInfo, WorkerLink

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepResult:
    tokens: dict[str, int]  # job id -> sampled token (from the last stage)
    logprobs: dict[str, TokenLogprobs]  # job id -> its token's logprobs, for jobs that asked
    forward_s: float  # model time summed over the stages
    total_s: float  # the slowest stage's whole command
    num_used_blocks: int  # most blocks any stage holds for jobs after the command
    swaps_done: list[SwapResult]  # swaps that finished on every stage
    num_swaps_in_flight: int


@dataclass(slots=True)
class StageTally:
    """What one stage reported, accumulated (for Stats and the bubble)."""

    num_commands: int = 0
    busy_s: float = 0.0  # model forward, excluding waits for activations
    wait_s: float = 0.0  # waiting for the previous stage
    num_used_blocks: int = 0
    first_command_at: float | None = None


@dataclass(frozen=True, slots=True)
class StageResult:
    """One stage's result of one command, wherever the stage runs."""

    tokens: dict[str, int]  # job id -> sampled token (the last stage samples)
    logprobs: dict[str, TokenLogprobs]
    forward_s: float
    wait_s: float
    total_s: float
    num_used_blocks: int
    swaps_done: list[SwapResult]  # this stage's shard of each swap
    num_swaps_in_flight: int


def stage_result_from_pb(result: wpb.Result) -> StageResult:
    return StageResult(
        tokens={t.job_id: t.token_id for t in result.tokens},
        logprobs={
            t.job_id: logprobs_from_pb(t.logprobs) for t in result.tokens if t.HasField("logprobs")
        },
        forward_s=result.forward_us / 1e6,
        wait_s=result.wait_us / 1e6,
        total_s=result.total_us / 1e6,
        num_used_blocks=result.num_used_blocks,
        swaps_done=[
            SwapResult(
                job_id=done.job_id,
                swap_in=done.direction == wpb.SWAP_DIRECTION_IN,
                ok=done.ok,
                num_bytes=done.num_bytes,
                duration_s=done.duration_us / 1e6,
            )
            for done in result.swaps_done
        ],
        num_swaps_in_flight=result.num_swaps_in_flight,
    )


class StageJoin:
    """Merges the stages' results of one command into one StepResult, and keeps each stage's
    tally. A swap is done when every stage has moved its shard; it failed if any stage failed."""

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self.tallies = [StageTally() for _ in range(num_stages)]
        self._parts: dict[tuple[str, bool], list[SwapResult]] = {}

    def forget_swaps(self) -> None:
        """The stages were reset: shards reported so far will never be joined."""
        self._parts.clear()

    def join(self, results: list[StageResult]) -> StepResult:
        now = time.perf_counter()
        swaps = []
        for tally, result in zip(self.tallies, results, strict=True):
            tally.num_commands += 1
            tally.busy_s += result.forward_s
            tally.wait_s += result.wait_s
            tally.num_used_blocks = result.num_used_blocks
            if tally.first_command_at is None:
                tally.first_command_at = now - result.total_s
            for done in result.swaps_done:
                joined = self._add_swap(done)
                if joined is not None:
                    swaps.append(joined)
        last = results[-1]
        return StepResult(
            tokens=last.tokens,
            logprobs=last.logprobs,
            forward_s=sum(r.forward_s for r in results),
            total_s=max(r.total_s for r in results),
            num_used_blocks=max(r.num_used_blocks for r in results),
            swaps_done=swaps,
            num_swaps_in_flight=max(r.num_swaps_in_flight for r in results),
        )

    def _add_swap(self, done: SwapResult) -> SwapResult | None:
        key = (done.job_id, done.swap_in)
        parts = self._parts.setdefault(key, [])
        parts.append(done)
        if len(parts) < self.num_stages:
            return None
        del self._parts[key]
        return SwapResult(
            job_id=done.job_id,
            swap_in=done.swap_in,
            ok=all(p.ok for p in parts),
            num_bytes=sum(p.num_bytes for p in parts),
            duration_s=max(p.duration_s for p in parts),
        )


class Pipeline:
    def __init__(self, addresses: list[str]) -> None:
        if not addresses:
            raise ValueError("a pipeline needs at least one stage address")
        self.links = [WorkerLink(address) for address in addresses]
        self.stages: list[WorkerInfo] = []
        self._join = StageJoin(len(addresses))

    @property
    def num_stages(self) -> int:
        return len(self.links)

    @property
    def tallies(self) -> list[StageTally]:
        return self._join.tallies

    @property
    def addresses(self) -> list[str]:
        return [link.address for link in self.links]

    def retarget(self, stage_index: int, address: str | None) -> None:
        if 0 <= stage_index < len(self.links):
            self.links[stage_index].retarget(address)

    def wait_for_info(self, timeout_s: float) -> WorkerInfo:
        """Waits for every stage; checks they form one pipeline; returns the whole view."""
        deadline = time.monotonic() + timeout_s
        self.stages = [
            link.wait_for_info(max(0.0, deadline - time.monotonic())) for link in self.links
        ]
        return self.check_layout(self.stages)

    @staticmethod
    def check_layout(stages: list[WorkerInfo]) -> WorkerInfo:
        first, last = stages[0], stages[-1]
        for index, stage in enumerate(stages):
            where = f"stage {index} ({stage.model_name})"
            if stage.stage_index != index or stage.num_stages != len(stages):
                raise WorkerError(
                    f"{where} reports stage {stage.stage_index} of {stage.num_stages}, "
                    f"expected {index} of {len(stages)}"
                )
            previous = stages[index - 1] if index else None
            expected_first = previous.first_layer + previous.num_layers if previous else 0
            if stage.num_layers and stage.first_layer != expected_first:
                raise WorkerError(
                    f"{where} starts at layer {stage.first_layer}, expected {expected_first}"
                )
            if (stage.model_name, stage.block_size) != (first.model_name, first.block_size):
                raise WorkerError(f"{where} does not match stage 0's model or block size")
        total = last.first_layer + last.num_layers
        if last.num_layers and total != last.num_total_layers:
            raise WorkerError(f"the stages cover {total} of {last.num_total_layers} layers")
        return WorkerInfo(
            model_name=first.model_name,
            num_blocks=min(s.num_blocks for s in stages),
            block_size=first.block_size,
            max_model_len=first.max_model_len,
            device=",".join(dict.fromkeys(s.device for s in stages)),
            dtype=first.dtype,
            vocab_size=first.vocab_size,
            # Stages move their shards at the same time: a swap takes the largest shard's time.
            block_bytes=max(s.block_bytes for s in stages),
            swap_enabled=all(s.swap_enabled for s in stages),
            stage_index=0,
            num_stages=len(stages),
            first_layer=0,
            num_layers=first.num_total_layers,
            num_total_layers=first.num_total_layers,
            layer_split=tuple(s.num_layers for s in stages),
        )

    def open(self) -> None:
        """(Re)connects every stage and resets it; several stages form a new group. Commands
        in flight are forgotten (their results will never come)."""
        pipeline_id = uuid.uuid4().hex if len(self.links) > 1 else ""
        self._join.forget_swaps()
        for link in self.links:
            link.close()
        # Every stage must be up before any is asked to form the group: a stage still
        # restarting would leave the others waiting for it until their timeout.
        for link in self.links:
            link.info()
        for link in self.links:
            link.connect()
        # Send every Reset before waiting for any: forming the group needs all stages at once.
        for link in self.links:
            link.send(wpb.Command(reset=wpb.Reset(pipeline_id=pipeline_id)))
        for link in self.links:
            link.receive()

    def submit(self, decision: Decision) -> None:
        """Sends the decision to every stage; its result comes from `collect`, in order."""
        command = decision_to_command(decision, decision.iteration_id)
        for link in self.links:
            link.send(command)

    def collect(self) -> StepResult:
        """The result of the oldest decision sent and not yet collected (the caller knows
        which: results come in the order the decisions were submitted)."""
        return self._join.join([stage_result_from_pb(link.receive()) for link in self.links])

    def execute(self, decision: Decision) -> StepResult:
        """One decision, start to end (nothing else in flight)."""
        self.submit(decision)
        return self.collect()

    def close(self) -> None:
        for link in self.links:
            link.close()
