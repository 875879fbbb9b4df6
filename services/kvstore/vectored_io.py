"""Vectored file I/O for values made of several buffers (a KV pool's block runs, say): one
pwritev / preadv moves them all, with no staging copy. Used by services.kvstore.shm for its
segment files, on the worker's swap path and in the store."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

# Most buffers one pwritev / preadv takes (Linux's UIO_MAXIOV).
IOV_MAX = 1024
# Values at least this large are read in two halves at once (see _in_halves).
PARALLEL_MIN_BYTES = 4 * 1024 * 1024

Buffer = bytes | bytearray | memoryview
# One buffer, or several that make up one value back to back.
Buffers = Buffer | Sequence[Buffer]


def byte_views(data: Buffers) -> list[memoryview]:
    """`data` as flat byte views, without copying: one buffer, or a sequence of them (the
    blocks of a KV pool, say, so that one system call moves them all: no staging copy)."""
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    return [memoryview(part).cast("B") for part in parts]


def num_bytes_of(data: Buffers) -> int:
    return sum(view.nbytes for view in byte_views(data))


def first_bytes(views: list[memoryview], num_bytes: int) -> list[memoryview]:
    """The views cut down to their first `num_bytes` in all; ValueError if they hold fewer."""
    kept = []
    for view in views:
        if num_bytes <= 0:
            break
        kept.append(view[:num_bytes])
        num_bytes -= kept[-1].nbytes
    if num_bytes > 0:
        raise ValueError(f"buffers hold {num_bytes} bytes too few")
    return kept


def _advance(views: list[memoryview], num_done: int) -> list[memoryview]:
    """What is left of `views` once their first `num_done` bytes are done."""
    index = 0
    while index < len(views) and num_done >= views[index].nbytes:
        num_done -= views[index].nbytes
        index += 1
    rest = views[index:]
    if rest and num_done:
        rest[0] = rest[0][num_done:]
    return rest


def _split(views: list[memoryview], num_bytes: int) -> tuple[list[memoryview], list[memoryview]]:
    """The views cut into their first `num_bytes` and the rest."""
    head = first_bytes(views, num_bytes)
    return head, _advance(views, num_bytes)


def _in_halves(
    fd: int, views: list[memoryview], move: Callable[[int, list[memoryview], int], bool]
) -> bool:
    """Runs `move(fd, views, offset)` over the two halves of a large value at once, one half
    on a helper thread (preadv releases the GIL): a tmpfs read is bound by one core's
    page-cache work (about half of memcpy speed), so two cores move it faster."""
    total = sum(view.nbytes for view in views)
    if total < PARALLEL_MIN_BYTES:
        return move(fd, views, 0)
    half = total // 2 // 4096 * 4096  # page-aligned, so the halves never share a page
    head, tail = _split(views, half)
    helper = _copy_helper().submit(move, fd, tail, half)
    done = move(fd, head, 0)
    return helper.result() and done


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> bool:
    pending = [view for view in views if view.nbytes]
    while pending:
        num_written = os.pwritev(fd, pending[:IOV_MAX], offset)
        offset += num_written
        pending = _advance(pending, num_written)
    return True


def _preadv_all(fd: int, views: list[memoryview], offset: int) -> bool:
    pending = [view for view in views if view.nbytes]
    while pending:
        num_read = os.preadv(fd, pending[:IOV_MAX], offset)
        if num_read == 0:
            return False
        offset += num_read
        pending = _advance(pending, num_read)
    return True


def write_all(fd: int, views: list[memoryview]) -> None:
    """Writes the views from offset 0, back to back (a pwritev may write less: loop). One
    thread: writes to one file serialise on its inode lock, so halves would not overlap."""
    _pwritev_all(fd, views, 0)


def read_all(fd: int, views: list[memoryview]) -> bool:
    """Fills the views from offset 0; False when the file ends first."""
    return _in_halves(fd, views, _preadv_all)


_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()


def _copy_helper() -> ThreadPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(1, thread_name_prefix="shm-copy")
        return _helper
