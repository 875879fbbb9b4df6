"""Entry point of the kvstore: `python -m services.kvstore.main` or `fastserve kvstore`."""

from __future__ import annotations

import argparse
import logging

from services.common.flags import add_flag
from services.common.lifecycle import GRACE_S, announce_ready, run_until_signal
from services.common.logs import LOG_LEVELS, setup_logging
from services.kvstore.server import serve

log = logging.getLogger(__name__)

DEFAULT_PORT = 50071
DEFAULT_CAPACITY_BYTES = 4 * 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--host", default="127.0.0.1", help="address to listen on")
    add_flag(parser, "--port", type=int, default=DEFAULT_PORT, help="port; 0 picks a free one")
    add_flag(
        parser,
        "--capacity-bytes",
        type=int,
        default=DEFAULT_CAPACITY_BYTES,
        help="most bytes of KV blocks held; puts beyond it are refused",
    )
    add_flag(parser, "--log-level", default="info", choices=LOG_LEVELS, help="log verbosity")


def run(args: argparse.Namespace) -> int:
    setup_logging("kvstore", args.log_level)
    if args.capacity_bytes < 0:
        log.error("--capacity-bytes must be >= 0, got %d", args.capacity_bytes)
        return 2
    server, port = serve(f"{_url_host(args.host)}:{args.port}", args.capacity_bytes)
    announce_ready("kvstore", f"{_url_host(args.host)}:{port}")

    def stop() -> None:
        server.stop(GRACE_S).wait()

    return run_until_signal("kvstore", stop)


def _url_host(host: str) -> str:
    """Brackets an IPv6 literal so a port can follow it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main() -> int:
    parser = argparse.ArgumentParser(prog="fastserve kvstore", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
