"""Priority classes at the edge: which class a request runs in, and what a caller may ask for.

A request asks for a class with `priority` (OpenAI HTTP body, gRPC field, SDK argument), as
vLLM's: a smaller value runs first. The deployment has `--priority-classes` N (0 .. N-1, at
most 16; default 1, so a request's priority changes nothing until classes are configured), a
`--default-priority` for requests that ask for none, and the highest class each caller may use:
an API key's own `top-priority=K` (see services/frontend/auth.py), otherwise `--top-priority`
(for every key that names none, and for everyone when no keys are configured).

A request that asks above its caller's right is capped to it and told so (HTTP header
`X-FastServe-Priority-Capped: true`, gRPC `priority_capped` on the last message); one that asks
for a class past the last one runs in the last. The class it ran in is reported beside
(`X-FastServe-Priority`, gRPC `priority`). The scheduler then runs higher classes first
(services/scheduler/core/priority.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from services.common.flags import add_flag

MAX_CLASSES = 16  # the scheduler's bound (core.job.MAX_PRIORITY_CLASSES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(
        parser,
        "--priority-classes",
        type=int,
        default=1,
        help=f"priority classes, 0 (runs first) to N-1, at most {MAX_CLASSES}; 1: one class for "
        "all, a request's priority changes nothing",
    )
    add_flag(
        parser,
        "--default-priority",
        type=int,
        default=0,
        help="the class of a request that asks for none (before the caller's cap)",
    )
    add_flag(
        parser,
        "--top-priority",
        type=int,
        default=0,
        help="the highest class (smallest number) a caller may use, unless its API key names "
        "its own with top-priority=K",
    )


@dataclass(frozen=True, slots=True)
class Granted:
    """The class a request runs in, and whether it asked for a higher one than its right."""

    priority: int = 0
    capped: bool = False


DEFAULT_GRANT = Granted()  # one class: everyone's


@dataclass(frozen=True, slots=True)
class PriorityRules:
    num_classes: int = 1
    default: int = 0
    top: int = 0  # for callers whose key names no top-priority of its own

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"--priority-classes must be in [1, {MAX_CLASSES}]")
        self.check_class("--default-priority", self.default)
        self.check_class("--top-priority", self.top)

    def check_class(self, name: str, value: int) -> None:
        if not 0 <= value < self.num_classes:
            raise ValueError(
                f"{name} must be a class, 0 to {self.num_classes - 1} (--priority-classes "
                f"{self.num_classes}), got {value}"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PriorityRules:
        return cls(args.priority_classes, args.default_priority, args.top_priority)

    def grant(self, asked: int | None, key_top: int | None = None) -> Granted:
        """The class for a request that asked for `asked` (None: nothing), from a caller whose
        key allows `key_top` at best (None: the deployment's --top-priority)."""
        top = self.top if key_top is None else key_top
        wanted = self.default if asked is None else asked
        priority = min(max(wanted, top), self.num_classes - 1)
        return Granted(priority, capped=asked is not None and asked < top)
