"""`fastserve worker`: one model-shard worker, the whole model or one pipeline stage.

On SIGTERM it keeps serving while a scheduler's command stream is open, for up to
--drain-timeout seconds, so that a scheduler stopped at the same time (a Kubernetes rollout or
uninstall stops pods independently) can run its admitted jobs to their end; then it stops. A
second SIGTERM stops it at once."""

from __future__ import annotations

import argparse
import logging
import os
import threading

import torch

from fastserve.worker.v1 import worker_pb2 as wpb
from fastserve.worker.v1 import worker_pb2_grpc
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
from services.common.model_source import (
    DEFAULT_MODEL,
    LOAD_FORMATS,
    load_config,
    max_model_len,
    resolve_model,
)
from services.worker.attention import BACKENDS as ATTENTION_BACKENDS
from services.worker.executor import Executor
from services.worker.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner
from services.worker.models.loader import load_serving_model
from services.worker.pipeline import BACKENDS, StageGroup
from services.worker.server import SERVICE_NAME, WorkerServicer
from services.worker.stage_layout import parse_layer_split, split_layers
from services.worker.swapper import Swapper

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--host", default="127.0.0.1", help="interface to listen on")
    add_flag(parser, "--port", type=int, default=50061, help="gRPC port (0 picks a free one)")
    add_reuse_port_flag(parser)
    add_metrics_port_flag(parser)
    add_flag(parser, "--model", default=DEFAULT_MODEL, help="model name, HF folder or .gguf")
    add_flag(parser, "--load-format", default="auto", choices=LOAD_FORMATS, help="dummy: random")
    add_flag(parser, "--device", default="cpu", help="cpu, cuda, cuda:N")
    add_flag(parser, "--dtype", default="float32", choices=sorted(DTYPES), help="weights and KV")
    add_flag(
        parser,
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="paged attention: cpu-kernel (CPU default), triton (CUDA default) or reference "
        "(gather + SDPA)",
    )
    add_flag(
        parser,
        "--cuda-graph-max-batch",
        type=int,
        default=64,
        help="on CUDA, decode steps of up to this many jobs replay CUDA graphs captured at "
        "start (0: never)",
    )
    add_flag(
        parser,
        "--cuda-graph-max-len",
        type=int,
        default=4096,
        help="context (tokens) the graphs' block tables cover; longer jobs' steps run eagerly",
    )
    add_flag(
        parser,
        "--launch-ahead",
        default="auto",
        choices=("auto", "on", "off"),
        help="launch a waiting command before collecting the previous one's tokens (auto: on "
        "CUDA, where the host then prepares a step while the GPU runs the one before)",
    )
    add_flag(parser, "--block-size", type=int, default=16, help="tokens per KV block")
    add_flag(parser, "--num-blocks", type=int, default=0, help="KV blocks (0: from --kv-bytes)")
    add_flag(parser, "--kv-bytes", type=int, default=1 << 30, help="KV pool size in bytes")
    add_flag(
        parser, "--kvstore-address", default="", help="kvstore for swapping (empty: no swapping)"
    )
    add_flag(
        parser, "--threads", type=int, default=0, help="compute threads (0: one per usable CPU)"
    )
    add_flag(parser, "--cpus", default="", help="CPU ids to run on, e.g. 0,1 (empty: all allowed)")
    add_flag(parser, "--stage-index", type=int, default=0, help="this worker's pipeline stage")
    add_flag(parser, "--num-stages", type=int, default=1, help="pipeline stages in all")
    add_flag(
        parser,
        "--layer-split",
        default="",
        help="decoder layers per stage, comma-separated, e.g. 10,20 (empty: even split)",
    )
    add_flag(
        parser,
        "--rendezvous-address",
        default="127.0.0.1:29500",
        help="HOST:PORT of the stage group's store, served by stage 0 (with --num-stages > 1)",
    )
    add_flag(
        parser,
        "--rendezvous-fd",
        type=int,
        default=-1,
        help="stage 0: serve the store on this inherited, bound socket (the launcher's)",
    )
    add_flag(
        parser,
        "--pipeline-backend",
        default="auto",
        choices=BACKENDS,
        help="activations between stages: nccl on GPU, gloo on CPU (auto picks by --device)",
    )
    add_flag(
        parser,
        "--stage-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the other stages (forming the group, activations)",
    )
    add_drain_timeout_flag(parser, "worker", "a scheduler still connected")
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


class DrainingServicer(WorkerServicer):
    """The worker's servicer, counting the schedulers' open command streams."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._streams_lock = threading.Lock()
        self.num_open_streams = 0

    def Run(self, request_iterator, context):  # type: ignore[no-untyped-def]
        with self._streams_lock:
            self.num_open_streams += 1
        try:
            yield from super().Run(request_iterator, context)
        finally:
            with self._streams_lock:
                self.num_open_streams -= 1


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively here (AVX512_BF16 or AMX on x86)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def configure_threads(threads: int, cpus: str) -> None:
    """Pins this process to `cpus` and sizes torch's (and the native kernels') OpenMP pool:
    one thread per usable CPU unless told otherwise. More threads than CPUs only contend."""
    if cpus:
        try:
            os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
        except (ValueError, OSError) as exc:
            raise SystemExit(f"worker: --cpus {cpus!r}: {exc}") from exc
    usable = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads if threads > 0 else usable)
    log.info("compute threads: %d on CPUs %s", torch.get_num_threads(), cpus or "all")


def check_args(args: argparse.Namespace) -> None:
    """Refuses settings no worker can run with, naming the flag."""
    for flag in ("--cuda-graph-max-batch", "--cuda-graph-max-len"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 0:
            raise SystemExit(f"worker: {flag} must be >= 0, got {value}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    setup_logging("worker", args.log_level)
    configure_threads(args.threads, args.cpus)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("worker: --device cuda requested but CUDA is not available")
    if args.device.startswith("cuda:"):
        index = torch.device(args.device).index or 0
        if index >= torch.cuda.device_count():
            raise SystemExit(
                f"worker: --device {args.device}, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (fastserve up --device cuda gives "
                "stage i cuda:i; two stages on one GPU need --pipeline-backend gloo and "
                "--device cuda:0,cuda:0)"
            )
    dtype = DTYPES[args.dtype]
    if args.device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning("this CPU has no native bfloat16 (AVX512_BF16 / AMX): bfloat16 is emulated")
    source = resolve_model(args.model)
    config = load_config(source)
    try:
        layers = split_layers(
            config.num_hidden_layers, args.num_stages, parse_layer_split(args.layer_split)
        )[args.stage_index]
        model = load_serving_model(
            source, layers=layers, dtype=dtype, device=args.device, load_format=args.load_format
        )
    except (ValueError, IndexError) as exc:
        raise SystemExit(f"worker: {exc}") from exc
    num_blocks = args.num_blocks or max(
        1,
        args.kv_bytes // ModelRunner.bytes_per_block(config, args.block_size, dtype, len(layers)),
    )
    try:
        runner = ModelRunner(
            model,
            num_blocks=num_blocks,
            block_size=args.block_size,
            attention_backend=args.attention_backend,
            # graphs need the Triton backend (the reference builds tensors from host lists)
            graph_max_batch=(
                args.cuda_graph_max_batch
                if args.device.startswith("cuda") and args.attention_backend != "reference"
                else 0
            ),
            graph_max_len=args.cuda_graph_max_len,
        )
    except ValueError as exc:
        raise SystemExit(f"worker: {exc}") from exc
    if runner.graphs is not None:
        log.info(
            "decode CUDA graphs for batch sizes %s, context up to %d blocks: captured in %.1f s",
            runner.graphs.sizes,
            runner.graphs.width,
            runner.graphs.capture_s,
        )
    stages = None
    if args.num_stages > 1:
        try:
            stages = StageGroup(
                args.stage_index,
                args.num_stages,
                args.rendezvous_address,
                device=runner.device,
                backend=args.pipeline_backend,
                timeout_s=args.stage_timeout,
                listen_fd=args.rendezvous_fd if args.rendezvous_fd >= 0 else None,
            )
        except ValueError as exc:
            raise SystemExit(f"worker: {exc}") from exc
    swapper = (
        Swapper(runner.kv_cache, args.kvstore_address, stage_index=args.stage_index)
        if args.kvstore_address
        else None
    )
    info = wpb.InfoResponse(
        model_name=source.name,
        stage_index=args.stage_index,
        num_stages=args.num_stages,
        first_layer=layers.start,
        num_layers=len(layers),
        num_total_layers=config.num_hidden_layers,
        num_blocks=num_blocks,
        block_size_tokens=args.block_size,
        block_bytes=runner.block_bytes,
        dtype=args.dtype,
        device=str(runner.device),
        vocab_size=config.vocab_size,
        max_model_len=max_model_len(config),
        tensor_parallel_size=1,
        swap_enabled=swapper is not None,
        hidden_size=config.hidden_size,
    )
    log.info(
        "loaded %s stage %d/%d (layers %d-%d): %d blocks x %d tokens on %s",
        source.name,
        args.stage_index,
        args.num_stages,
        layers.start,
        layers.stop - 1,
        num_blocks,
        args.block_size,
        info.device,
    )
    executor = Executor(runner, swapper, stages)
    metrics = WorkerMetrics(executor, info)
    metrics_server = start_metrics_server(
        metrics.registry, args.host, args.metrics_port, f"worker stage {args.stage_index}"
    )
    server, health = build_server([SERVICE_NAME], max_workers=8, reuse_port=args.reuse_port)
    overlap = {"auto": None, "on": True, "off": False}[args.launch_ahead]
    servicer = DrainingServicer(executor, info, observer=metrics.observe, overlap=overlap)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = bind(server, f"{args.host}:{args.port}")
    server.start()
    set_health(health, [SERVICE_NAME], serving=True)
    catch_stop_signals()
    announce_ready("worker", f"{args.host}:{port}")

    def stop() -> None:
        set_health(health, [SERVICE_NAME], serving=False)
        if servicer.num_open_streams:
            log.info(
                "worker: serving its scheduler until it disconnects (up to %gs)", args.drain_timeout
            )
            if not drain_while(lambda: servicer.num_open_streams > 0, args.drain_timeout):
                log.warning("worker: stopping with a scheduler still connected")
        server.stop(grace=1).wait()
        if metrics_server is not None:
            metrics_server.stop()

    return run_until_signal("worker", stop)
