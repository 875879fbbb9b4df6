"""Flags that fall back to environment variables, so a container can be configured either way.

`add_flag(parser, "--max-batch-size", type=int, default=16, help=...)` reads
FASTSERVE_MAX_BATCH_SIZE when the flag is absent; the help text names the variable.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

ENV_PREFIX = "FASTSERVE_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_flag(parser: argparse.ArgumentParser, flag: str, *aliases: str, **kwargs: Any) -> None:
    """Adds `flag` (and `aliases`), defaulting to the environment variable named after it."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None:
        if kwargs.get("action") == "store_true":
            kwargs["default"] = raw.lower() in ("1", "true", "yes", "on")
        else:
            convert = kwargs.get("type", str)
            kwargs["default"] = convert(raw)
    help_text = kwargs.pop("help", "")
    default = kwargs.get("default")
    suffix = f" [env {env}" + (f"; default {default}" if default not in (None, "") else "") + "]"
    parser.add_argument(flag, *aliases, help=help_text + suffix, **kwargs)
