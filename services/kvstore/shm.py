"""Shared-memory segments: the kvstore's fast path for a worker on the same host.

A segment is a plain file in a tmpfs directory (normally /dev/shm) holding exactly one block
group's bytes. A client writes one and sends only its name (PutShm); the store takes it over by
renaming it, so the store never copies the bytes. GetShm answers with a name the client copies
out of. Only the name and the meta cross gRPC.

Every file of one store starts with `fskv-<instance>-`, so stores sharing a directory never touch
each other's files:
  `<prefix>c-<random>`  a client's: written by it, or a spare given to it (PutShm takes only these)
  `<prefix>s-<n>`       a value the store owns (memory backend)
  `<prefix>f-<n>`       a spare: a released value's file, kept to be filled again
  `<prefix>h-<n>`       a copy made for one GetShm, given to the client
  `<prefix>probe`       a token: a client that reads it there shares the directory with the store
  `<prefix>lock`        held locked (flock) for the store's life
On shutdown the store removes every file with its prefix, a client's leftovers included. A store
killed before it could (SIGKILL, OOM) leaves its files behind; the next store to open the
directory removes every prefix whose lock file it can lock, i.e. whose owner is gone.

Recycling: a new tmpfs file costs the kernel a page allocation and zeroing per 4 KiB (about
1.7 GB/s here), while writing over an existing file runs at memcpy speed (about 12 GB/s). So the
store keeps released values as spares (up to `pool_limit_bytes`), hands one to the client in
each PutShm reply for its next put of that size, and makes GetShm copies in spares too; a client
keeps a few spares of its own.
NOTE: a spare is written again while an old reader may still be copying the value it held.
Readers therefore copy (they never keep a mapping of a store-owned file) and check afterwards
that the name they opened still names the same file (`read_into`). The store renames a file
before anyone may write it again and never reuses a name, so an unchanged name proves the copy
is whole. A client must not touch a file after handing it over.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from services.kvstore.backend import FieldError
from services.kvstore.vectored_io import Buffers, byte_views, first_bytes, read_all, write_all

log = logging.getLogger(__name__)

DEFAULT_SHM_DIR = "/dev/shm"
NAME_PREFIX = "fskv-"
# A copy made for GetShm that its client did not take (the client died) goes after this long.
HANDOUT_TTL_S = 60.0
# Most bytes of released files kept as spares (see Recycling above).
DEFAULT_POOL_LIMIT_BYTES = 256 * 1024 * 1024
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def host_id() -> str:
    """Identifies the running kernel: equal on every process (and container) of one host."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return socket.gethostname()


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """What a client needs to know about a store, and to decide whether the fast path works."""

    backend: str  # "memory" or "redis"
    capacity_bytes: int
    host_id: str  # the store host's `host_id()`
    shm_dir: str  # "" when the fast path is off
    shm_client_prefix: str  # names of client-written segments start with it
    shm_probe_name: str  # a file in shm_dir holding shm_probe_token
    shm_probe_token: str
    max_chunk_bytes: int  # most payload bytes per Put/Get chunk

    def shm_usable_here(self) -> bool:
        """Whether this process sees the store's shm directory: same host, and the probe file
        there holds the token (a container on the same host may have a /dev/shm of its own)."""
        if not self.shm_dir or self.host_id != host_id():
            return False
        try:
            token = (Path(self.shm_dir) / self.shm_probe_name).read_text()
        except OSError:
            return False
        return token == self.shm_probe_token


@dataclass(frozen=True, slots=True)
class ShmSegment:
    """A store-owned file holding one value; implements backend.Segment."""

    path: str
    num_bytes: int
    area: ShmArea | None = None  # recycles it on release; None: release removes it

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def __len__(self) -> int:
        return self.num_bytes

    def read(self) -> bytes:
        """A checked copy (see `read_into`); FileNotFoundError once released."""
        try:
            with open(self.path, "rb", buffering=0) as file:
                data = file.read()
                intact = len(data) == self.num_bytes and _same_file(self.path, file.fileno())
        except FileNotFoundError:
            intact = False
        if not intact:
            raise FileNotFoundError(f"segment {self.path} was released")
        return data

    @contextmanager
    def view(self) -> Iterator[memoryview]:
        """The bytes mapped read-only for the block. Only while no one else can release it."""
        if self.num_bytes == 0:
            yield memoryview(b"")
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, self.num_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        view = memoryview(mapping)
        try:
            yield view
        finally:
            view.release()
            mapping.close()

    def release(self) -> None:
        if self.area is not None:
            self.area.recycle(self)
        else:
            remove(self.path)


class ShmArea:
    """The store's side of the fast path: its files in one directory, their names, the pool of
    spares, cleanup."""

    def __init__(self, directory: str, pool_limit_bytes: int = DEFAULT_POOL_LIMIT_BYTES) -> None:
        self.directory = os.path.realpath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"shm directory {directory} does not exist")
        self.pool_limit_bytes = pool_limit_bytes
        self.prefix = f"{NAME_PREFIX}{secrets.token_hex(6)}-"
        self.client_prefix = self.prefix + "c-"
        self.probe_name = self.prefix + "probe"
        self.probe_token = secrets.token_hex(16)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._spares: dict[int, list[str]] = {}  # size -> paths of spare files
        self._pool_bytes = 0
        self._handouts: dict[str, float] = {}  # path -> time.monotonic() when made
        # The lock first, so a sweeper never sees this store's files without it; locked before
        # it is renamed into place, so no sweeper can find it unlocked while this store lives.
        lock_path = self._path(self.prefix + "lock")
        self._lock_fd = os.open(lock_path + ".new", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(lock_path + ".new", lock_path)
        write_file(self._path(self.probe_name), self.probe_token.encode())
        sweep_dead_stores(self.directory)

    def check_client_segment(self, name: str, total_bytes: int) -> str:
        """The path of a client's segment; FieldError naming shm_name or meta.total_bytes when
        it is not one (outside the directory, missing, not a file, the wrong size)."""
        if not name:
            raise FieldError("shm_name", "must not be empty")
        if "/" in name or "\0" in name or name in (".", ".."):
            raise FieldError(
                "shm_name", f"must be a file name inside {self.directory}, got {name!r}"
            )
        if not name.startswith(self.client_prefix) or len(name) == len(self.client_prefix):
            raise FieldError(
                "shm_name", f"must start with {self.client_prefix!r} (see Info), got {name!r}"
            )
        path = self._path(name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise FieldError("shm_name", f"no segment {name!r} in {self.directory}") from None
        if not stat.S_ISREG(info.st_mode):
            raise FieldError("shm_name", f"{name!r} is not a regular file")
        if info.st_size != total_bytes:
            raise FieldError(
                "meta.total_bytes",
                f"segment {name!r} has {info.st_size} bytes, meta.total_bytes is {total_bytes}",
            )
        return path

    def adopt(self, name: str, total_bytes: int) -> ShmSegment:
        """Takes a client's segment over by renaming it to a store name, so the client's name
        no longer reaches it. Raises FieldError as `check_client_segment`."""
        path = self.check_client_segment(name, total_bytes)
        owned = self._new_path("s")
        try:
            os.rename(path, owned)
        except FileNotFoundError:
            raise FieldError("shm_name", f"no segment {name!r} in {self.directory}") from None
        segment = ShmSegment(owned, total_bytes, area=self)
        if os.stat(owned).st_size != total_bytes:  # the client resized it meanwhile
            remove(owned)
            raise FieldError("meta.total_bytes", f"segment {name!r} changed size")
        return segment

    def recycle(self, segment: ShmSegment) -> None:
        """Keeps a released segment's file as a spare while the pool has room, else removes
        it. Renamed first: see the NOTE at the top."""
        with self._lock:
            keep = 0 < segment.num_bytes <= self.pool_limit_bytes - self._pool_bytes
            if keep:
                self._pool_bytes += segment.num_bytes
        if not keep:
            remove(segment.path)
            return
        spare = self._new_path("f")
        try:
            os.rename(segment.path, spare)
        except FileNotFoundError:
            with self._lock:
                self._pool_bytes -= segment.num_bytes
            return
        with self._lock:
            self._spares.setdefault(segment.num_bytes, []).append(spare)

    def give_spare(self, num_bytes: int) -> str:
        """The name of a spare of `num_bytes`, now the client's to fill and put; "" if none."""
        path = self._take_spare(num_bytes, f"{self.client_prefix}{next(self._counter)}")
        return os.path.basename(path) if path else ""

    def hand_out(self, data: bytes | memoryview) -> str:
        """A segment holding a copy of `data` for one GetShm, now the client's."""
        self._sweep_handouts()
        name = f"{self.prefix}h-{next(self._counter)}"
        path = self._take_spare(len(data), name)
        if path is None or not _overwrite(path, data):
            write_file(self._path(name), data)
        with self._lock:
            self._handouts[self._path(name)] = time.monotonic()
        return name

    def pool_bytes(self) -> int:
        with self._lock:
            return self._pool_bytes

    def close(self) -> None:
        """Removes every file of this store: values, spares, copies, a client's leftovers."""
        with self._lock:
            self._handouts.clear()
            self._spares.clear()
            self._pool_bytes = 0
        num_removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(self.prefix):
                    remove(entry.path)
                    num_removed += 1
        log.info("removed %d shared-memory files from %s", num_removed, self.directory)
        os.close(self._lock_fd)

    def _take_spare(self, num_bytes: int, name: str) -> str | None:
        """Renames a spare of `num_bytes` to `name`; its new path, or None if there is none."""
        with self._lock:
            spares = self._spares.get(num_bytes)
            if not spares:
                return None
            spare = spares.pop()
            self._pool_bytes -= num_bytes
        path = self._path(name)
        try:
            os.rename(spare, path)
        except FileNotFoundError:
            return None
        return path

    def _sweep_handouts(self) -> None:
        """Removes copies a client never took (it died): those still under their h- name."""
        deadline = time.monotonic() - HANDOUT_TTL_S
        with self._lock:
            stale = [path for path, made in self._handouts.items() if made < deadline]
            for path in stale:
                del self._handouts[path]
        for path in stale:
            remove(path)

    def _new_path(self, kind: str) -> str:
        return self._path(f"{self.prefix}{kind}-{next(self._counter)}")

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def sweep_dead_stores(directory: str) -> int:
    """Removes the files of stores that died without cleaning up (their lock file is not held
    any more); returns how many files went."""
    dead = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not (entry.name.startswith(NAME_PREFIX) and entry.name.endswith("-lock")):
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except OSError:
                continue  # removed meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its store is alive
            finally:
                os.close(fd)
            dead.append(entry.name.removesuffix("lock"))
    if not dead:
        return 0
    num_removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            # The lock file last, so a sweep that stops half-way is finished by the next one.
            if entry.name.startswith(tuple(dead)) and not entry.name.endswith("-lock"):
                remove(entry.path)
                num_removed += 1
    for prefix in dead:
        remove(os.path.join(directory, prefix + "lock"))
    log.info("removed %d files of %d dead stores from %s", num_removed, len(dead), directory)
    return num_removed


def remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def write_file(path: str, data: Buffers) -> None:
    """Writes a new file (never an existing one) with one copy of `data` (one buffer, or
    several written back to back); a full tmpfs raises OSError (ENOSPC) here rather than
    SIGBUS on a mapped page later."""
    views = byte_views(data)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        write_all(fd, views)
    except BaseException:
        os.close(fd)
        remove(path)
        raise
    os.close(fd)


def _overwrite(path: str, data: Buffers) -> bool:
    """Writes `data` over an existing file of exactly its size; False (and the file removed)
    when that is not possible."""
    views = byte_views(data)
    num_bytes = sum(view.nbytes for view in views)
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != num_bytes:
            raise OSError(f"{path} is not {num_bytes} bytes")
        write_all(fd, views)
    except OSError:
        os.close(fd)
        remove(path)
        return False
    os.close(fd)
    return True


def overwrite_or_write(path: str, new_path: str, data: Buffers) -> str:
    """Fills the spare at `path` (when given and still there) or else a new file at `new_path`;
    returns the path written."""
    if path and _overwrite(path, data):
        return path
    write_file(new_path, data)
    return new_path


def read_into(path: str, out: Buffers, num_bytes: int) -> bool:
    """Copies the file at `path` into the first `num_bytes` of `out` (one buffer, or several
    filled in turn); True only when the file was there, was `num_bytes` long, and still has
    that name after the copy, i.e. nobody could have written it meanwhile (see the NOTE at
    the top)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != num_bytes:
            return False
        if not read_all(fd, first_bytes(byte_views(out), num_bytes)):
            return False
        return _same_file(path, fd)
    finally:
        os.close(fd)


def _same_file(path: str, fd: int) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_ino, named.st_dev) == (opened.st_ino, opened.st_dev)
