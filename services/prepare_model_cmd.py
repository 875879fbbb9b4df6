"""`fastserve prepare-model [--model M]`: convert a GGUF model once into the model cache
(services/common/model_source.py), so that services start without reading the GGUF.

Every service converts on its first start anyway; this does it ahead of time, for an image
whose root filesystem is read-only at run time (deploy/docker/Dockerfile runs it at build time
with FASTSERVE_MODEL_CACHE inside the image). Prints the folder the services will load.
"""

from __future__ import annotations

import argparse
import sys

from services.common import model_source
from services.common.flags import add_flag
from services.common.model_source import DEFAULT_MODEL, ModelNotFoundError, resolve_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `prepare-model` subcommand's arguments to `parser`."""
    add_flag(parser, "--model", default=DEFAULT_MODEL, help="model name, HF folder or .gguf")


def run(args: argparse.Namespace) -> int:
    try:
        source = resolve_model(args.model)
    except ModelNotFoundError as exc:
        print(f"fastserve prepare-model: {exc}", file=sys.stderr)
        return 2
    if not source.gguf_file:
        print(f"{source.directory} (a Hugging Face folder: nothing to convert)")
        return 0
    folder = model_source.local_folder(source)
    if folder == source:
        cache = model_source.MODEL_CACHE
        print(f"fastserve prepare-model: cannot write the model cache {cache}", file=sys.stderr)
        return 1
    print(folder.directory)
    return 0
