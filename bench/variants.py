"""Policy variants of the benchmarks: a policy, its options and its KV policy, parsed from a
spec such as `sj-paper=skip-join-mlfq:charge=whole,backfill=off` or `fcfs@recompute`, and
turned into `fastserve up` flags. Pure; shared by bench/policies.py and bench/simulate.py."""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.core.config import KV_POLICIES

SHORT_NAMES = {"skip-join-mlfq": "sj-mlfq"}


@dataclass(frozen=True, slots=True)
class Variant:
    """A policy with options, as passed to `fastserve up`."""

    # Name in reports and plots.
    label: str
    # Value of `--policy`.
    policy: str
    # `--policy-option` pairs, in order.
    options: tuple[tuple[str, str], ...] = ()
    # `--kv-policy`, when the variant sets its own (else the sweep's).
    kv_policy: str | None = None

    @property
    def is_plain_fcfs(self) -> bool:
        """fcfs with no options: the baseline the summary divides by (any KV policy)."""
        return self.policy == "fcfs" and not self.options

    def flags(self) -> list[str]:
        flags = ["--policy", self.policy]
        for key, value in self.options:
            flags += ["--policy-option", f"{key}={value}"]
        if self.kv_policy:
            flags += ["--kv-policy", self.kv_policy]
        return flags


def parse_variant(spec: str) -> Variant:
    """`[label=]policy[:key=value,...][@kv-policy]`, e.g.
    `sj-paper=skip-join-mlfq:charge=whole,backfill=off` or `fcfs@recompute`.

    Without a label: the policy name, plus `/key=value` per option (skip-join-mlfq shortened to
    sj-mlfq when it has options), plus `@kv-policy` when one is given."""
    spec_text, has_kv, kv_policy = spec.rpartition("@")
    if not has_kv:
        spec_text, kv_policy = spec, ""
    elif kv_policy not in KV_POLICIES:
        raise ValueError(f"kv policy {kv_policy!r} in {spec!r} is not one of {KV_POLICIES}")
    head, _, option_text = spec_text.partition(":")
    label, has_label, policy = head.rpartition("=")
    if not has_label:
        label, policy = "", head
    if not policy:
        raise ValueError(f"policy spec {spec!r} names no policy")
    options = []
    for item in filter(None, option_text.split(",")):
        key, has_value, value = item.partition("=")
        if not key or not has_value:
            raise ValueError(f"policy option {item!r} in {spec!r} is not KEY=VALUE")
        options.append((key, value))
    if not label:
        label = policy
        if options:
            short = SHORT_NAMES.get(policy, policy)
            label = "/".join([short, *(f"{k}={v}" for k, v in options)])
        if kv_policy:
            label += f"@{kv_policy}"
    return Variant(label, policy, tuple(options), kv_policy or None)
