"""Host-to-device copies that do not make the host wait for the GPU.

`cudaMemcpyAsync` from pageable host memory first waits for the stream's queued work, so a step's
inputs copied from a numpy array block the worker until the previous step's kernels have run:
the host could not prepare step k+1 while step k runs. From pinned memory the copy is queued
and the host moves on. The pinned copy comes from torch's caching host allocator, which keeps
the block from being reused until the copy that reads it has run.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device, out: torch.Tensor | None = None):
    """`array` on `device` (into `out` when given), queued behind the stream's work on CUDA."""
    host = torch.from_numpy(array)
    if device.type == "cuda":
        host = host.pin_memory()
    if out is not None:
        return out.copy_(host, non_blocking=True)
    return host.to(device, non_blocking=True)
