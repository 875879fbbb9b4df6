"""The links between pipeline stages: activations go stage i -> stage i + 1 by torch.distributed
point-to-point (gloo on CPU, NCCL on GPU), never through the scheduler.

Stage 0 hosts the rendezvous store (a c10d TCPStore) for its whole life. Each time the scheduler
resets the pipeline it names a new group id, and every stage forms a fresh process group under
that prefix of the store. A stage that restarts cannot rejoin an old group, so the scheduler
re-forms the whole pipeline with a new id instead; the old group's sockets break and its
pending sends and receives fail fast ("connection closed by peer") rather than hang.

No shapes travel with the tensors: every stage gets the same Step command, so each knows how
many rows the previous stage sends ([tokens of the step, hidden size]).
"""

from __future__ import annotations

import datetime
import logging
import socket
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")


class StageDeviceError(RuntimeError):
    """Pipeline stages that cannot share the device they were given."""


def device_identity(device: torch.device) -> str:
    """Which physical device this is, comparable across processes on one host and across
    hosts: host name and GPU UUID for CUDA; host name and "cpu" otherwise."""
    host = socket.gethostname()
    if device.type != "cuda":
        return f"{host}/cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"{host}/{uuid or f'cuda:{index}'}"


def first_shared_device(devices: list[str]) -> tuple[int, int] | None:
    """The first two stages (by index) on the same device, or None."""
    seen: dict[str, int] = {}
    for stage, device in enumerate(devices):
        if device in seen:
            return seen[device], stage
        seen[device] = stage
    return None


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--rendezvous-address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class StageGroup:
    """This stage's place in the pipeline's process group."""

    def __init__(
        self,
        stage_index: int,
        num_stages: int,
        rendezvous: str,
        *,
        device: torch.device,
        backend: str = "auto",
        timeout_s: float = 60.0,
        listen_fd: int | None = None,
    ) -> None:
        """`listen_fd`: stage 0 serves the store on this inherited, bound socket (what the
        local launcher passes, so no other process can take the port first)."""
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"--stage-index must be in [0, {num_stages}), got {stage_index}")
        if backend not in BACKENDS:
            raise ValueError(f"--pipeline-backend must be one of {BACKENDS}, got {backend!r}")
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.device = device
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        self.backend = backend
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._host, self._port = parse_address(rendezvous)
        self._store: dist.TCPStore | None = None
        if stage_index == 0:
            # The master store lives as long as stage 0; the other stages connect per group.
            self._store = dist.TCPStore(
                self._host,
                self._port,
                None,
                True,
                timeout=self._timeout,
                wait_for_workers=False,
                master_listen_fd=listen_fd,
            )
        self._group: dist.ProcessGroup | None = None
        self.group_id = ""
        self._pending_send: dist.Work | None = None
        self._send_buffer: torch.Tensor | None = None

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def form(self, group_id: str) -> None:
        """Joins the group `group_id`; returns once every stage has joined (or raises after
        the timeout)."""
        if not group_id:
            raise ValueError("reset.pipeline_id: required with several pipeline stages")
        self.close()
        store = self._store
        if store is None:
            store = dist.TCPStore(self._host, self._port, None, False, timeout=self._timeout)
        prefixed = dist.PrefixStore(f"fastserve/{group_id}/", store)
        started = time.perf_counter()
        self._check_devices(prefixed)
        if self.backend == "nccl":
            self._group = dist.ProcessGroupNCCL(prefixed, self.stage_index, self.num_stages)
        else:
            self._group = dist.ProcessGroupGloo(
                prefixed, self.stage_index, self.num_stages, self._timeout
            )
        self.group_id = group_id
        log.info(
            "stage %d/%d joined pipeline group %s (%s) in %.2fs",
            self.stage_index,
            self.num_stages,
            group_id,
            self.backend,
            time.perf_counter() - started,
        )

    def _check_devices(self, store: dist.Store) -> None:
        """Every stage says which device it runs on before the group forms; with NCCL, two
        stages on one GPU are refused with a message that says so (NCCL would fail with an
        error that does not)."""
        store.set(f"device/{self.stage_index}", device_identity(self.device))
        keys = [f"device/{i}" for i in range(self.num_stages)]
        store.wait(keys, self._timeout)
        devices = [store.get(key).decode() for key in keys]
        if self.backend == "nccl" and (clash := first_shared_device(devices)) is not None:
            first, second = clash
            raise StageDeviceError(
                f"pipeline stages {first} and {second} are both on GPU {devices[first]}: NCCL "
                "cannot run two pipeline ranks on one device. Give each stage its own GPU "
                "(--device cuda:N, or CUDA_VISIBLE_DEVICES per worker), or pass "
                "--pipeline-backend gloo to send activations through host memory"
            )

    def send_next(self, hidden: torch.Tensor) -> None:
        """Sends activations to the next stage without waiting for it to take them; the send
        is completed before the next one starts (the buffer stays alive until then)."""
        group = self._require_group()
        self._finish_send()
        tensor = hidden.contiguous()
        if self.backend == "gloo" and tensor.device.type != "cpu":
            tensor = tensor.cpu()  # gloo moves host memory; one GPU shared by stages
        self._send_buffer = tensor
        self._pending_send = group.send([tensor], self.stage_index + 1, 0)

    def recv_previous(self, num_rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Receives the previous stage's activations [num_rows, hidden_size]."""
        group = self._require_group()
        on_device = self.backend == "nccl"
        buffer = torch.empty(
            (num_rows, hidden_size), dtype=dtype, device=self.device if on_device else "cpu"
        )
        group.recv([buffer], self.stage_index - 1, 0).wait()
        return buffer.to(self.device, non_blocking=False)

    def close(self) -> None:
        """Leaves the current group (pending sends are abandoned)."""
        self._pending_send = None
        self._send_buffer = None
        self._group = None
        self.group_id = ""

    def _finish_send(self) -> None:
        if self._pending_send is not None:
            work, self._pending_send = self._pending_send, None
            work.wait()
        self._send_buffer = None

    def _require_group(self) -> dist.ProcessGroup:
        if self._group is None:
            raise RuntimeError("the pipeline group is not formed (no Reset with a pipeline_id)")
        return self._group
