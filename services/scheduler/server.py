"""The scheduler's gRPC edge: Connect streams from frontends, and Stats."""

from __future__ import annotations

import logging
import threading
import uuid

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.scheduler.convert import event_to_pb, job_from_submit
from services.scheduler.engine import Engine

log = logging.getLogger(__name__)

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self, engine: Engine, policy_name: str, block_size: int, kv_policy: str = ""
    ) -> None:
        self._engine = engine
        self._policy_name = policy_name
        self._kv_policy = kv_policy
        self._block_size = block_size

    def Connect(self, request_iterator, context):
        frontend_id = uuid.uuid4().hex[:12]
        outbox = self._engine.connect(frontend_id)
        log.info("frontend %s connected (%s)", frontend_id, context.peer())
        context.add_callback(lambda: self._engine.disconnect(frontend_id))
        reader = threading.Thread(
            target=self._read, args=(frontend_id, request_iterator), daemon=True
        )
        reader.start()
        while (item := outbox.get()) is not None:
            yield spb.SchedulerMessage(
                iteration_id=item.iteration_id,
                events=[event_to_pb(event, job_id) for job_id, event in item.events],
            )
        log.info("frontend %s disconnected", frontend_id)

    def _read(self, frontend_id: str, request_iterator) -> None:
        try:
            for message in request_iterator:
                if message.submits:
                    jobs, rejected = [], []
                    for submit in message.submits:
                        try:
                            jobs.append(job_from_submit(submit, submit.job_id))
                        except ValueError as exc:
                            rejected.append((submit.job_id, str(exc)))
                    self._engine.submit(frontend_id, jobs, rejected)
                if message.cancel_job_ids:
                    self._engine.cancel(frontend_id, list(message.cancel_job_ids))
        except Exception as exc:  # the stream broke; the callback cancels the jobs
            log.info("frontend %s stream ended: %s", frontend_id, exc)
        finally:
            self._engine.disconnect(frontend_id)

    def Stats(self, request, context):
        s = self._engine.stats
        return spb.StatsResponse(
            policy=self._policy_name,
            num_waiting_jobs=s.num_waiting_jobs,
            num_running_jobs=s.num_running_jobs,
            num_total_blocks=s.num_total_blocks,
            num_free_blocks=s.num_free_blocks,
            block_size_tokens=self._block_size,
            num_iterations=s.num_iterations,
            num_submitted_jobs=s.num_submitted_jobs,
            num_finished_jobs=s.num_finished_jobs,
            num_cancelled_jobs=s.num_cancelled_jobs,
            num_rejected_jobs=s.num_rejected_jobs,
            num_recomputed_jobs=s.num_recomputed_jobs,
            mean_iteration_ms=s.mean_iteration_ms,
            mean_forward_ms=s.mean_forward_ms,
            mean_batch_jobs=s.mean_batch_jobs,
            mean_batch_tokens=s.mean_batch_tokens,
            num_frontends=s.num_frontends,
            num_worker_used_blocks=s.num_worker_used_blocks,
            kv_policy=self._kv_policy,
            num_swapped_out_jobs=s.num_swapped_out_jobs,
            num_swapped_in_jobs=s.num_swapped_in_jobs,
            num_swap_failures=s.num_swap_failures,
            num_host_jobs=s.num_host_jobs,
            swap_bytes_per_s=s.swap_bytes_per_s,
            swap_out_bytes=s.swap_out_bytes,
            swap_in_bytes=s.swap_in_bytes,
            stages=[
                spb.StageStats(
                    stage_index=v.stage_index,
                    address=v.address,
                    first_layer=v.first_layer,
                    num_layers=v.num_layers,
                    num_used_blocks=v.num_used_blocks,
                    num_commands=v.num_commands,
                    busy_s=v.busy_s,
                    wait_s=v.wait_s,
                    wall_s=v.wall_s,
                )
                for v in s.stages
            ],
        )
