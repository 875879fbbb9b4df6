"""Process-wide logging set-up: one line per record, tagged with the service name."""

from __future__ import annotations

import logging
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(service: str, level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname).1s [{service}] %(name)s: %(message)s",
        force=True,
    )
