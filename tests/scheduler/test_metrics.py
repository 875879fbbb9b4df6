"""The scheduler's metrics port: the core's new stats, and the collector's exposition text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.frontend.metrics import PROTOCOL_METRICS, SchedulerStatsCollector
from services.scheduler.core import SchedulerStats
from services.scheduler.core.stats import Counters
from services.scheduler.engine import Engine
from services.scheduler.engine_stats import EngineStats, StageView
from services.scheduler.metrics import make_registry
from services.scheduler.pipeline import Pipeline
from services.scheduler.server import SchedulerServicer
from services.scheduler.worker_link import WorkerInfo
from tests.scheduler.factories import make_jobs, make_scheduler, run_iteration


def scrape(stats: EngineStats) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed back from the exposition text."""
    text = generate_latest(make_registry(lambda: stats)).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def stage(index: int, **overrides) -> StageView:
    values = dict(
        stage_index=index,
        address=f"10.0.0.{index}:50061",
        first_layer=4 * index,
        num_layers=4,
        num_used_blocks=10 + index,
        num_commands=100,
        busy_s=1.5 + index,
        wait_s=0.25 * index,
        wall_s=9.0,
        num_total_blocks=64,
    )
    values.update(overrides)
    return StageView(**values)


def test_collector_exports_counters_gauges_levels_and_stages():
    check_exported_series()


def check_exported_series():
    stats = EngineStats(
        core=SchedulerStats(
            counters=Counters(
                num_iterations=1000,
                num_finished_jobs=17,
                num_recomputed_jobs=2,
                num_swapped_out_jobs=4,
                num_preemptions=6,
            ),
            num_waiting_jobs=5,
            num_running_jobs=3,
            num_total_blocks=64,
            num_free_blocks=40,
            mean_iteration_s=0.025,
            mean_batch_jobs=3.5,
            mean_batch_tokens=40.25,
            num_preempted_jobs=2,
            num_jobs_per_level=(1, 0, 4),
        ),
        swap_out_bytes=1 << 20,
        swap_in_bytes=1 << 19,
        mean_forward_s=0.02,
        stages=(stage(0), stage(1, num_total_blocks=80), stage(2, num_total_blocks=0)),
    )
    metrics = scrape(stats)
    prefix = "fastserve_scheduler_"

    def value(name: str, **labels: str) -> float:
        return metrics[(prefix + name, tuple(sorted(labels.items())))]

    assert value("iterations_total") == 1000
    assert value("finished_jobs_total") == 17
    assert value("recomputed_jobs_total") == 2
    assert value("swapped_out_jobs_total") == 4
    assert value("preemptions_total") == 6
    assert value("swap_out_bytes_total") == 1 << 20
    assert value("swap_in_bytes_total") == 1 << 19
    assert value("waiting_jobs") == 5 and value("running_jobs") == 3
    assert value("preempted_jobs") == 2
    assert value("kv_blocks_total") == 64 and value("kv_blocks_free") == 40
    assert value("kv_blocks_used") == 24
    assert value("mean_iteration_seconds") == 0.025
    assert value("mean_forward_seconds") == 0.02
    assert value("mean_batch_jobs") == 3.5 and value("mean_batch_tokens") == 40.25
    assert [value("queue_depth", level=str(k)) for k in range(3)] == [1, 0, 4]
    assert value("stage_kv_blocks_used", stage="1") == 11
    # Each stage's own pool minus its own use; a stage whose pool is unknown has no series.
    assert value("stage_kv_blocks_free", stage="0") == 64 - 10
    assert value("stage_kv_blocks_free", stage="1") == 80 - 11
    assert (prefix + "stage_kv_blocks_free", (("stage", "2"),)) not in metrics
    assert value("stage_busy_seconds_total", stage="1") == 2.5
    assert value("stage_wait_seconds_total", stage="1") == 0.25
    assert value("stage_commands_total", stage="0") == 100
    info = {"stage": "1", "address": "10.0.0.1:50061", "first_layer": "4", "num_layers": "4"}
    assert value("stage_info", **info) == 1
    return stats, metrics


def test_the_stats_rpc_carries_every_series_the_metrics_port_exports():
    """One table drives both: what a frontend re-exports from the Stats RPC is, name for name
    and value for value, what the scheduler's own /metrics port says."""
    stats, own = check_exported_series()

    class FakeEngine:
        pass

    engine = FakeEngine()
    engine.stats = stats
    response = SchedulerServicer(engine, "fcfs", 16, "recompute").Stats(None, None)
    assert (response.policy, response.block_size_tokens, response.kv_policy) == (
        "fcfs",
        16,
        "recompute",
    )
    collector = SchedulerStatsCollector()
    collector.stats = response
    registry = CollectorRegistry()
    registry.register(collector)
    relayed = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    assert relayed.pop(("fastserve_scheduler_up", ())) == 1
    # Besides, the model server protocol's gauges, computed from the same answer
    # (tests/frontend/test_protocol_metrics.py checks their values).
    protocol = {key for key in relayed if key[0] in PROTOCOL_METRICS.values()}
    assert {name for name, _ in protocol} == set(PROTOCOL_METRICS.values())
    for key in protocol:
        del relayed[key]
    assert relayed == own
    families = {
        family.name: family.type
        for family in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert families["fastserve_scheduler_finished_jobs"] == "counter"
    assert families["fastserve_scheduler_queue_depth"] == "gauge"


def worker_info(stage_index: int, num_blocks: int) -> WorkerInfo:
    return WorkerInfo(
        model_name="tiny",
        num_blocks=num_blocks,
        block_size=16,
        max_model_len=512,
        device="cpu",
        dtype="float32",
        vocab_size=100,
        block_bytes=4096,
        swap_enabled=False,
        stage_index=stage_index,
        num_stages=2,
        first_layer=2 * stage_index,
        num_layers=2,
        num_total_layers=4,
    )


def test_engine_snapshot_gives_each_stage_its_own_pool_size():
    # Stages with pools of different sizes (the scheduler itself allocates from the smaller).
    pipeline = Pipeline(["127.0.0.1:1", "127.0.0.1:2"])  # channels connect lazily: none here
    try:
        pipeline.stages = [worker_info(0, 100), worker_info(1, 80)]  # as wait_for_info sets
        pipeline.tallies[0].num_used_blocks = 30  # as collect() records each stage's result
        pipeline.tallies[1].num_used_blocks = 5
        engine = Engine(make_scheduler(num_blocks=80), pipeline)
        engine._publish_stats(force=True)  # what the loop does after an iteration
        metrics = scrape(engine.stats)
    finally:
        pipeline.close()
    free = {
        dict(labels)["stage"]: value
        for (name, labels), value in metrics.items()
        if name == "fastserve_scheduler_stage_kv_blocks_free"
    }
    assert free == {"0": 70, "1": 75}
    assert metrics[("fastserve_scheduler_kv_blocks_free", ())] == 80


def test_collector_reads_the_latest_snapshot_at_each_scrape():
    current = [EngineStats(core=SchedulerStats(Counters(num_finished_jobs=1)))]
    registry = make_registry(lambda: current[0])
    assert b"fastserve_scheduler_finished_jobs_total 1.0" in generate_latest(registry)
    current[0] = EngineStats(core=SchedulerStats(Counters(num_finished_jobs=2)))  # replaced whole
    assert b"fastserve_scheduler_finished_jobs_total 2.0" in generate_latest(registry)


def test_core_counts_waiting_jobs_per_mlfq_level_with_every_level_present():
    core = make_scheduler(
        policy="skip-join-mlfq",
        max_batch_size=1,
        num_blocks=2048,
        max_model_len=4096,
        max_batched_tokens=4096,
    )
    levels = [
        core.add_job(job)[0].queue_level
        for job in make_jobs(3, prompt_len=lambda i: (4, 4, 3000)[i])
    ]
    assert levels[0] == levels[1] < levels[2]
    stats = core.stats()
    assert len(stats.num_jobs_per_level) == len(core.policy.quanta)
    assert stats.num_jobs_per_level[levels[0]] == 2 and stats.num_jobs_per_level[levels[2]] == 1
    core.schedule()  # one job runs: it no longer waits at its level
    stats = core.stats()
    assert stats.num_jobs_per_level[levels[0]] == 1
    assert sum(stats.num_jobs_per_level) == stats.num_waiting_jobs == 2


def test_core_counts_preempted_jobs_and_preemptions():
    core = make_scheduler(num_blocks=4, block_size=4, max_batch_size=4)
    assert core.stats().num_jobs_per_level == (0,)  # FCFS: one level
    first, second = make_jobs(2, prompt_len=8, max_tokens=8)
    core.add_job(first)
    core.add_job(second)
    seen_preempted = 0
    while core.has_work():
        run_iteration(core)
        seen_preempted = max(seen_preempted, core.stats().num_preempted_jobs)
    assert seen_preempted == 1  # the second job, evicted once by the first
    stats = core.stats()
    assert stats.counters.num_preemptions == second.num_preemptions == 1
    assert stats.num_preempted_jobs == 0  # nobody left
