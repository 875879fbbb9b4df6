"""`fastserve`: one entry point for every process and for a quick generation.

    fastserve up                      all four services on this machine
    fastserve frontend|scheduler|worker|kvstore ...   one service (what a container runs)
    fastserve generate "PROMPT"       stream an answer through the SDK
    fastserve prepare-model           convert a GGUF model into the cache ahead of time

Each command's module is imported only when chosen, so `fastserve generate` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "up": ("services.launcher", "start every service locally and wait until all are ready"),
    "frontend": ("services.frontend.main", "the public gRPC gateway"),
    "scheduler": ("services.scheduler.main", "the scheduler"),
    "worker": ("services.worker.main", "a model-shard worker"),
    "kvstore": ("services.kvstore.main", "the host-memory KV block store"),
    "generate": ("services.generate_cmd", "stream a completion from a running server"),
    "prepare-model": ("services.prepare_model_cmd", "convert a GGUF model into the cache now"),
}


def _usage() -> str:
    lines = ["usage: fastserve COMMAND [flags]   (fastserve COMMAND --help for flags)", ""]
    lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"fastserve: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, description = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fastserve {argv[0]}", description=description)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
