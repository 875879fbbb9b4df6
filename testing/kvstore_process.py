"""Starting the kvstore as a real process with any flags, for tests and benchmarks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 15.0
READY_LINE = re.compile(r"kvstore ready on (\S+)")


@dataclass
class KVStoreProcess:
    process: subprocess.Popen[str]
    address: str
    output: list[str] = field(default_factory=list)  # stdout and stderr lines so far


def start_kvstore(*flags: str) -> KVStoreProcess:
    """`python -m services.kvstore.main --port 0 *flags`, once it printed its ready line.
    RuntimeError (with its output) when it exits or stays silent instead."""
    process = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore.main", "--port", "0", *flags],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    ready = threading.Event()
    address: list[str] = []

    def read_output() -> None:  # keeps draining, so a chatty store never blocks on its pipe
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = READY_LINE.search(line)
            if match and not ready.is_set():
                address.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    ready.wait(READY_TIMEOUT_S)
    if not address:
        process.kill()
        process.wait()
        raise RuntimeError(f"kvstore did not start; output:\n{''.join(output)}")
    return KVStoreProcess(process=process, address=address[0], output=output)


def stop_kvstore(kvstore: KVStoreProcess, sig: int = signal.SIGTERM) -> int:
    kvstore.process.send_signal(sig)
    try:
        return kvstore.process.wait(timeout=10)
    finally:
        if kvstore.process.poll() is None:
            kvstore.process.kill()
            kvstore.process.wait()


def run_kvstore_to_exit(*flags: str, timeout_s: float = 15.0) -> subprocess.CompletedProcess[str]:
    """For flags the store refuses: runs it and returns its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "services.kvstore.main", "--port", "0", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
