"""Policies by name, as `--policy` and `--policy-option key=value` choose them."""

from __future__ import annotations

from collections.abc import Mapping

from services.scheduler.core.baselines import FcfsPolicy, SrptOraclePolicy
from services.scheduler.core.mlfq import MlfqPolicy, parse_mlfq_options
from services.scheduler.core.policy import Policy
from services.scheduler.core.profile import SYNTHETIC_PROFILE, PerformanceProfile

POLICY_NAMES = ("skip-join-mlfq", "mlfq", "fcfs", "srpt-oracle")


def make_policy(
    name: str,
    options: Mapping[str, str] | None = None,
    profile: PerformanceProfile | None = None,
    *,
    max_model_len: int = 2048,
    max_batch_size: int = 16,
) -> Policy:
    """Builds a policy by name; `options` are `--policy-option key=value` pairs."""
    options = dict(options or {})
    profile = profile or SYNTHETIC_PROFILE
    if name in ("skip-join-mlfq", "mlfq"):
        parsed = parse_mlfq_options(
            options,
            profile,
            max_model_len=max_model_len,
            max_batch_size=max_batch_size,
            skip_join=name == "skip-join-mlfq",
        )
        return MlfqPolicy(parsed, profile, name, batch_size=max_batch_size)
    if options:
        raise ValueError(f"policy {name!r} takes no options, got {sorted(options)}")
    if name == "fcfs":
        return FcfsPolicy()
    if name == "srpt-oracle":
        return SrptOraclePolicy(profile)
    raise ValueError(f"unknown policy {name!r}; choose from {list(POLICY_NAMES)}")
