"""Triton kernels for the worker's CUDA path: paged attention and the fused layer ops.

They are written once and compiled by Triton for the GPU they run on. On a machine without CUDA
the same kernels run in Triton's interpreter (numpy, orders of magnitude slower), which is how
the test suite checks them against the torch reference on CPU: a kernel the tests pass is the
kernel the GPU compiles. Triton is imported only when a kernel is first asked for, so the
worker needs it only where it uses it (torch's CUDA wheels carry it; the dev requirements add
it for the tests).

Triton decides at import whether kernels are compiled or interpreted, for the whole process:
`triton()` imports it in interpreter mode where CUDA is absent (tests/conftest.py does the same
before anything else can import it), compiled mode otherwise. The kernel functions are plain
Python functions in their modules, decorated by `jit` when first used.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch


def available() -> bool:
    """Whether Triton is installed here."""
    return importlib.util.find_spec("triton") is not None


def triton() -> ModuleType:
    """The triton module, imported in interpreter mode on a machine without CUDA."""
    if "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton as module

    return module


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def jit(fn: Callable[..., Any]) -> Any:
    """`fn` as a Triton kernel."""
    return triton().jit(fn)


def check_device(tensor: torch.Tensor) -> None:
    """Kernels take CUDA tensors, or CPU tensors where Triton interprets them."""
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
            f"not on {tensor.device}"
        )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
