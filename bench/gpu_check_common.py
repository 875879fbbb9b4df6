"""What the parts of `bench.gpu_check` share: the repository root, a step's result, the wheels
an offline GPU machine needs, and the device helpers of the steps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
Result = dict[str, Any]
BLOCK_SIZE = 16  # tokens per KV block in every step

# The wheels an offline GPU machine needs beyond torch and transformers (pip name, version).
WHEELS = {
    "grpcio": "1.85.1",
    "grpcio-health-checking": "1.85.1",
    "grpcio-reflection": "1.85.1",
    "protobuf": ">=7.35.1",
    "redis": "any",
    "prometheus_client": "any",
}


def cuda_mode(args: argparse.Namespace) -> bool:
    return bool(args.device == "cuda")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wheels_to_carry() -> list[str]:
    """WHEELS as the report lists them."""
    return [name if version == "any" else f"{name} {version}" for name, version in WHEELS.items()]
