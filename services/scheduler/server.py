"""The scheduler's gRPC edge: Connect streams from frontends, and Stats."""

from __future__ import annotations

import logging
import threading
import uuid

from fastserve.scheduler.v1 import scheduler_pb2 as spb
from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.scheduler.convert import event_to_pb, job_from_submit
from services.scheduler.engine import Engine
from services.scheduler.inbox import Cancel, Submit
from services.scheduler.stats_table import TABLE, Kind

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
        self.draining = False  # set on SIGTERM: new jobs are refused, with retry

    def start_draining(self) -> None:
        """From now on new jobs are refused (the frontend answers UNAVAILABLE, the client
        retries); the jobs admitted run on."""
        self.draining = True

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
                events=[event_to_pb(event) for event in item.events],
            )
        log.info("frontend %s disconnected", frontend_id)

    def _read(self, frontend_id: str, request_iterator) -> None:
        try:
            for message in request_iterator:
                if message.submits:
                    if self.draining:
                        refused = [submit.job_id for submit in message.submits]
                        self._engine.post(Submit(frontend_id, [], refused=refused))
                        continue
                    jobs, rejected = [], []
                    for submit in message.submits:
                        try:
                            jobs.append(job_from_submit(submit))
                        except ValueError as exc:
                            rejected.append((submit.job_id, str(exc)))
                    self._engine.post(Submit(frontend_id, jobs, rejected))
                if message.cancel_job_ids:
                    self._engine.post(Cancel(frontend_id, list(message.cancel_job_ids)))
        except Exception as exc:  # the stream broke; the callback cancels the jobs
            log.info("frontend %s stream ended: %s", frontend_id, exc)
        finally:
            self._engine.disconnect(frontend_id)

    def Stats(self, request, context):
        stats = self._engine.stats
        return spb.StatsResponse(
            policy=self._policy_name,
            block_size_tokens=self._block_size,
            kv_policy=self._kv_policy,
            metrics=[
                spb.Metric(
                    name=series.name,
                    type=_METRIC_TYPES[series.kind],
                    help=series.help,
                    samples=[
                        spb.MetricSample(labels=labels, value=value)
                        for labels, value in series.samples(stats)
                    ],
                )
                for series in TABLE
            ],
        )


_METRIC_TYPES = {Kind.COUNTER: spb.METRIC_TYPE_COUNTER, Kind.GAUGE: spb.METRIC_TYPE_GAUGE}
