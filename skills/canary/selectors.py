"""Reads of canary releases: which arm a session is in (the runtime's, on the request path:
no I/O), the running canary, and the figures that decide it (incidents per 1,000 turns per arm,
by the policy version number that turns and incidents record)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

from django.db.models import Count, QuerySet
from django.utils import timezone

from base.models import Project
from incidents.selectors import incidents_for_project, trajectories_for_project
from skills.canary.models import CanaryOutcome, CanaryRelease

# One-sided 95 %: the canary's rate must be above control's beyond chance, not only by margin.
Z_CRITICAL = 1.645


@dataclass(frozen=True)
class ServingCanary:
    """What the runtime needs to split sessions: immutable, cached per process."""

    project_id: int
    release_id: int
    version: int
    share_percent: int

    def serves(self, session_id: str) -> bool:
        """Whether the session is in the canary arm: a hash of the project, the release and the
        session id, so a session stays in its arm for the whole release."""
        key = f"{self.project_id}:{self.release_id}:{session_id}".encode()
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 10_000
        return bucket < self.share_percent * 100


def running_canary(project: Project | int) -> CanaryRelease | None:
    project_id = project if isinstance(project, int) else project.pk
    return (
        CanaryRelease.objects.select_related("version")
        .filter(project_id=project_id, outcome=CanaryOutcome.RUNNING)
        .first()
    )


def serving_canary(project_id: int) -> ServingCanary | None:
    canary = running_canary(project_id)
    if canary is None or canary.version.status != "candidate":
        return None
    return ServingCanary(project_id, canary.pk, canary.version.number, canary.share_percent)


def canaries_for_project(project: Project, limit: int = 10) -> list[CanaryRelease]:
    return list(CanaryRelease.objects.filter(project=project).select_related("version")[:limit])


@dataclass(frozen=True)
class Arm:
    turns: int
    incidents: int

    @property
    def rate(self) -> float:
        """Incidents per 1,000 turns."""
        return 1000.0 * self.incidents / self.turns if self.turns else 0.0


@dataclass(frozen=True)
class Figures:
    canary: Arm
    control: Arm
    margin_per_1000: float
    min_turns: int
    z: float
    enough_evidence: bool
    worse_by_margin: bool

    @property
    def rollback(self) -> bool:
        return self.enough_evidence and self.worse_by_margin and self.z >= Z_CRITICAL

    def as_dict(self) -> dict:
        data = asdict(self)
        data["canary"]["rate"] = round(self.canary.rate, 2)
        data["control"]["rate"] = round(self.control.rate, 2)
        data["z"] = round(self.z, 3)
        data["rollback"] = self.rollback
        return data


def _z(canary: Arm, control: Arm) -> float:
    """Two-proportion z of the canary's incident rate over control's (rates capped at one
    incident a turn)."""
    if not canary.turns or not control.turns:
        return 0.0
    p1 = min(1.0, canary.incidents / canary.turns)
    p2 = min(1.0, control.incidents / control.turns)
    pooled = min(1.0, (canary.incidents + control.incidents) / (canary.turns + control.turns))
    spread = math.sqrt(pooled * (1 - pooled) * (1 / canary.turns + 1 / control.turns))
    if spread == 0:
        return 0.0
    return (p1 - p2) / spread


def _by_session_arm(rows: Iterable[tuple[str, int]], serving: ServingCanary) -> tuple[int, int]:
    """(canary, control) totals of per-session counts, each session by the arm it hashes to."""
    canary = control = 0
    for session_id, n in rows:
        if serving.serves(session_id):
            canary += n
        else:
            control += n
    return canary, control


def _unversioned_by_session(queryset: QuerySet) -> Iterable[tuple[str, int]]:
    return (
        queryset.filter(policy_version__isnull=True)
        .exclude(session_id="")
        .values_list("session_id")
        .annotate(n=Count("pk"))
        .values_list("session_id", "n")
    )


def canary_figures(canary: CanaryRelease, *, until: datetime | None = None) -> Figures:
    """Each arm's turns and incidents since the canary started: the canary's by its version
    number, control's by every other version (the active one may change meanwhile). Turns and
    incidents reported without a version but with a session (an agent that fetches its policy
    itself, ``GET /runtime/policy`` with its session) count to the arm the session hashes to,
    which is the arm that served it."""
    until = until or canary.ended_at or timezone.now()
    since = canary.started_at
    turns = trajectories_for_project(canary.project).filter(
        occurred_at__gte=since, occurred_at__lt=until
    )
    incidents = incidents_for_project(canary.project, since=since, until=until)
    number = canary.version.number
    serving = ServingCanary(canary.project_id, canary.pk, number, canary.share_percent)
    canary_turns, control_turns = _by_session_arm(_unversioned_by_session(turns), serving)
    canary_incidents, control_incidents = _by_session_arm(
        _unversioned_by_session(incidents), serving
    )
    versioned_turns = turns.filter(policy_version__isnull=False)
    versioned_incidents = incidents.filter(policy_version__isnull=False)
    canary_arm = Arm(
        versioned_turns.filter(policy_version=number).count() + canary_turns,
        versioned_incidents.filter(policy_version=number).count() + canary_incidents,
    )
    control_arm = Arm(
        versioned_turns.exclude(policy_version=number).count() + control_turns,
        versioned_incidents.exclude(policy_version=number).count() + control_incidents,
    )
    return Figures(
        canary=canary_arm,
        control=control_arm,
        margin_per_1000=canary.margin_per_1000,
        min_turns=canary.min_turns,
        z=_z(canary_arm, control_arm),
        enough_evidence=min(canary_arm.turns, control_arm.turns) >= canary.min_turns,
        worse_by_margin=canary_arm.rate - control_arm.rate > canary.margin_per_1000,
    )
