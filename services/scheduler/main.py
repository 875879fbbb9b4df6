"""`fastserve scheduler`: the scheduler process.

On SIGTERM it drains before it stops: its health turns to not serving, new jobs are refused
(the frontend answers UNAVAILABLE / 503 with Retry-After, so clients retry elsewhere), and the
jobs it holds (running, waiting, swapped out) run to their end for up to --drain-timeout
seconds, so a pod that Kubernetes stops does not drop admitted requests; then it stops (jobs
still left end with an error, and their clients retry). A second SIGTERM stops it at once."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from fastserve.scheduler.v1 import scheduler_pb2_grpc
from services.common.flags import add_flag
from services.common.grpc_server import add_reuse_port_flag, bind, build_server, set_health
from services.common.lifecycle import (
    add_drain_timeout_flag,
    announce_ready,
    catch_stop_signals,
    drain_while,
    run_until_signal,
)
from services.common.logs import LOG_LEVELS, setup_logging
from services.common.metrics_port import add_metrics_port_flag, start_metrics_server
from services.scheduler.core import SchedulerConfig, SchedulerCore
from services.scheduler.core.config import KV_POLICIES
from services.scheduler.core.policies import make_policy
from services.scheduler.discovery import add_discovery_arguments, discovery_from_args
from services.scheduler.engine import STATS_INTERVAL_S, Engine
from services.scheduler.metrics import make_registry
from services.scheduler.pipeline import Pipeline
from services.scheduler.policy_flags import add_policy_arguments, policy_options
from services.scheduler.profiler import load_or_measure
from services.scheduler.server import SERVICE_NAME, SchedulerServicer
from services.scheduler.worker_link import WorkerError, WorkerLink

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--host", default="127.0.0.1", help="interface to listen on")
    add_flag(parser, "--port", type=int, default=50052, help="gRPC port (0 picks a free one)")
    add_reuse_port_flag(parser)
    add_metrics_port_flag(parser)
    add_flag(parser, "--worker-address", default="127.0.0.1:50061", help="worker stage 0")
    add_flag(parser, "--kvstore-address", default="127.0.0.1:50071", help="KV store")
    add_policy_arguments(parser)
    add_discovery_arguments(parser)
    add_flag(parser, "--max-batch-size", type=int, default=16, help="jobs per iteration")
    add_flag(parser, "--max-batched-tokens", type=int, default=2048, help="tokens per iteration")
    add_flag(
        parser,
        "--kv-policy",
        default="proactive",
        choices=KV_POLICIES,
        help="what preemption does with KV: swap ahead of need, swap at need, or recompute",
    )
    add_flag(
        parser,
        "--reserve-blocks",
        type=int,
        default=-1,
        help="free blocks proactive swapping keeps for arrivals (-1: 5%% of the pool)",
    )
    add_flag(
        parser,
        "--swap-cost-scale",
        type=float,
        default=1.0,
        help="weight of swap cost against recompute cost; 0 always swaps",
    )
    add_flag(
        parser,
        "--no-async-scheduling",
        action="store_true",
        help="wait for each step's tokens before scheduling the next one (by default, with one "
        "pipeline stage, a decoding job's next step is sent while its current one runs, and "
        "the worker feeds it the token it sampled)",
    )
    add_flag(
        parser,
        "--no-prefix-cache",
        action="store_true",
        help="compute every prompt from scratch instead of sharing cached prefix blocks",
    )
    add_flag(
        parser,
        "--host-cache-blocks",
        type=int,
        default=-1,
        help="cached prefix blocks kept in the kvstore after leaving the device "
        "(-1: as many as the device pool; 0: none)",
    )
    add_flag(
        parser, "--worker-timeout", type=float, default=600.0, help="seconds to wait for worker"
    )
    add_drain_timeout_flag(parser, "scheduler", "the jobs it holds")
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


def has_jobs(engine: Engine) -> bool:
    """Whether the engine still holds a job (from its last published stats)."""
    core = engine.stats.core
    return bool(
        core.num_waiting_jobs + core.num_running_jobs + core.num_preempted_jobs + core.num_host_jobs
    )


def run(args: argparse.Namespace) -> int:
    setup_logging("scheduler", args.log_level)
    discovery = discovery_from_args(args)
    discovery.start()
    try:
        # Stage 0 says how many stages there are; then wait for all of them.
        stage0 = discovery.wait_for_workers(1, args.worker_timeout)[0]
        num_stages = WorkerLink(stage0).wait_for_info(args.worker_timeout).num_stages
        addresses = discovery.wait_for_workers(num_stages, args.worker_timeout)
        worker = Pipeline([addresses[i] for i in range(num_stages)])

        def follow(found) -> None:  # a replaced stage pod: reconnect there on the next open
            for index in range(num_stages):
                worker.retarget(index, found.worker_addresses.get(index))

        discovery.subscribe(follow)
        info = worker.wait_for_info(args.worker_timeout)
    except (TimeoutError, WorkerError) as exc:
        raise SystemExit(f"scheduler: {exc}") from exc
    log.info(
        "workers %s: %s on %s (%s), %d stage(s) of %s layers, %d blocks of %d tokens",
        ", ".join(worker.addresses),
        info.model_name,
        info.device,
        info.dtype,
        info.num_stages,
        "+".join(map(str, info.layer_split)),
        info.num_blocks,
        info.block_size,
    )
    options = policy_options(args)
    backfill = options.pop("backfill", "on").lower() not in ("off", "false", "0", "no")
    config = SchedulerConfig(
        num_blocks=info.num_blocks,
        block_size=info.block_size,
        max_model_len=info.max_model_len,
        max_batch_size=args.max_batch_size,
        max_batched_tokens=max(args.max_batched_tokens, args.max_batch_size),
        backfill=backfill,
        kv_policy=args.kv_policy,
        swap_enabled=info.swap_enabled,
        reserve_blocks=(args.reserve_blocks if args.reserve_blocks >= 0 else info.num_blocks // 20),
        block_bytes=info.block_bytes,
        swap_cost_scale=args.swap_cost_scale,
        prefix_caching=not args.no_prefix_cache,
        # One stage only: with several, the token is sampled on the last and needed on the first.
        async_decode=not args.no_async_scheduling and info.num_stages == 1,
        # What else fixes a block's content besides its tokens: the model and the stage layout.
        prefix_cache_salt=f"{info.model_name}|{info.dtype}|{'+'.join(map(str, info.layer_split))}",
        host_cache_blocks=(
            args.host_cache_blocks if args.host_cache_blocks >= 0 else info.num_blocks
        ),
    )
    try:
        worker.open()  # the stages form their group: a stage that cannot join says why
    except WorkerError as exc:
        raise SystemExit(f"scheduler: the pipeline could not form: {exc}") from exc
    profile = load_or_measure(
        worker,
        info,
        max_batch_size=config.max_batch_size,
        max_batched_tokens=config.max_batched_tokens,
        cache_dir=Path(args.profile_dir) if args.profile_dir else None,
    )
    try:
        policy = make_policy(
            args.policy,
            options,
            profile,
            max_model_len=config.max_model_len,
            max_batch_size=config.max_batch_size,
        )
    except ValueError as exc:
        raise SystemExit(f"scheduler: {exc}") from exc
    log.info("policy %s: %s", args.policy, getattr(policy, "options", ""))
    if args.kv_policy != "recompute" and not info.swap_enabled:
        log.warning("kv policy %s needs a worker with a kvstore; recomputing", args.kv_policy)
    engine = Engine(SchedulerCore(config, policy, profile=profile), worker)
    metrics = start_metrics_server(
        make_registry(lambda: engine.stats), args.host, args.metrics_port, "scheduler"
    )
    engine.start()
    server, health = build_server([SERVICE_NAME], reuse_port=args.reuse_port)
    servicer = SchedulerServicer(engine, args.policy, info.block_size, args.kv_policy)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
    port = bind(server, f"{args.host}:{args.port}")
    server.start()
    set_health(health, [SERVICE_NAME], serving=True)
    catch_stop_signals()
    announce_ready("scheduler", f"{args.host}:{port}")

    def stop() -> None:
        set_health(health, [SERVICE_NAME], serving=False)
        servicer.start_draining()  # new jobs: refused, and their clients retry
        # Submits read before that are in the engine's inbox: let it admit them and publish.
        time.sleep(2 * STATS_INTERVAL_S)
        if has_jobs(engine):
            log.info("scheduler: draining its jobs (up to %gs)", args.drain_timeout)
            if not drain_while(lambda: has_jobs(engine), args.drain_timeout):
                log.warning("scheduler: stopping with jobs left")
        server.stop(grace=2).wait()
        if metrics is not None:
            metrics.stop()
        engine.stop()
        discovery.stop()

    return run_until_signal("scheduler", stop)
