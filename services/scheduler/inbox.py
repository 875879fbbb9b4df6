"""What gRPC handlers hand the engine loop: typed messages, each naming the frontend (owner)
whose jobs it concerns. The loop alone touches the core (docs/design.md, section 13)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scheduler.core import Job


@dataclass(frozen=True, slots=True)
class Submit:
    """New jobs from one frontend; `rejected` are (job id, error) pairs its edge could not
    even parse."""

    owner: str
    jobs: list[Job]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    # Job ids refused because the scheduler is shutting down: the frontend answers UNAVAILABLE
    # and the client retries (on another replica).
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Cancel:
    owner: str
    job_ids: list[str]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The frontend's stream broke: cancel all its jobs."""

    owner: str


InboxMessage = Submit | Cancel | Disconnect
