"""The worker's CPU kernels in C++ (this folder), built once per machine and loaded by ctypes.

- paged_attention.cpp: attention over the block pool, read in place, one call per layer;
- layer_ops.cpp: residual add + RMSNorm, rotary + K/V store, SiLU * up, one pass each.

Why compiled code rather than torch ops: on CPU a small model's decode layer is a few KB of
element-wise work spread over some fifteen ops, each paying torch's dispatch, and any torch
expression of "job s's keys" is a copy of its whole context per layer. Why ctypes rather than a
torch extension: no torch headers, so the build takes seconds, not a minute.

The library is compiled for the machine's own instruction set (`-march=native`, or
FASTSERVE_KERNEL_MARCH) into FASTSERVE_KERNEL_CACHE (default ~/.cache/fastserve/kernels), named by
a hash of the sources, the compiler and the CPU's flags, so another CPU or a changed source gets
its own build. Processes
starting together each compile to a private file and rename it into place. Where no compiler is
found or nothing can be written, `library()` returns None (after one warning) and callers use
their torch path. OpenMP here is the libgomp torch itself loads (same soname), so the kernels
share torch's thread pool instead of starting a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent
SOURCES = ("paged_attention.cpp", "layer_ops.cpp")
# The instruction set to build for: this machine's own by default; an image built on one machine
# and run on others sets a portable one (the Dockerfile: x86-64-v3) and builds at image time.
MARCH = os.environ.get("FASTSERVE_KERNEL_MARCH", "native")
FLAGS = ("-O3", f"-march={MARCH}", "-fopenmp", "-fPIC", "-std=c++17")
# layer_ops rounds where torch rounds: no multiply-add contraction there.
EXTRA_FLAGS = {"layer_ops.cpp": ("-ffp-contract=off",)}
KERNEL_CACHE = Path(
    os.environ.get("FASTSERVE_KERNEL_CACHE", Path.home() / ".cache" / "fastserve" / "kernels")
)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_library: ctypes.CDLL | None = None
_failed = False


def library() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built here."""
    global _library, _failed
    if _library is None and not _failed:
        try:
            _library = ctypes.CDLL(str(build()))
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            _failed = True
            detail = getattr(exc, "stderr", b"") or b""
            log.warning(
                "native CPU kernels unavailable (%s %s): torch ops instead",
                exc,
                detail.decode(errors="replace")[-500:],
            )
    return _library


def build() -> Path:
    """Compiles the sources unless this machine's build is cached; returns the library's path."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256()
    for name in (*SOURCES, "storage.h"):
        key.update((FOLDER / name).read_bytes())
    for part in (version, repr(FLAGS), repr(EXTRA_FLAGS)):
        key.update(part.encode())
    if MARCH == "native":  # the build fits this CPU only
        key.update(_cpu_flags())
    target = KERNEL_CACHE / f"fastserve-native-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=KERNEL_CACHE) as scratch:
        objects = []
        for name in SOURCES:
            obj = Path(scratch) / f"{name}.o"
            flags = (*FLAGS, *EXTRA_FLAGS.get(name, ()))
            subprocess.run(
                [compiler, *flags, "-c", str(FOLDER / name), "-o", str(obj)],
                capture_output=True,
                check=True,
            )
            objects.append(str(obj))
        linked = Path(scratch) / "lib.so"
        subprocess.run(
            [compiler, "-shared", "-fopenmp", *objects, "-o", str(linked)],
            capture_output=True,
            check=True,
        )
        os.replace(linked, target)
    log.info("built the native CPU kernels: %s", target)
    return target


def num_threads() -> int:
    return torch.get_num_threads()


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return platform.processor().encode()
