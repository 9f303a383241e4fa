"""Reads of the replay gate that pages, the API and the promotion check share."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import QuerySet

from base.models import Project
from incidents.models import Incident
from incidents.selectors import incidents_for_project
from skills.gate.models import GateStatus, ReplayGate
from skills.versions.models import PolicyVersion


def latest_gate(version: PolicyVersion) -> ReplayGate | None:
    return ReplayGate.objects.filter(version=version).order_by("-created_at", "-id").first()


def gate_with_pairs(version: PolicyVersion) -> tuple[ReplayGate | None, list]:
    """The version's latest gate and its pairs (losses first: what a reviewer reads first)."""
    gate = latest_gate(version)
    if gate is None:
        return None, []
    order = {"loss": 0, "win": 1, "tie": 2}
    pairs = sorted(gate.pairs.select_related("incident"), key=lambda p: (order[p.verdict], p.pk))
    return gate, pairs


def gate_passed(version: PolicyVersion, baseline_number: int) -> bool:
    """Whether the version's latest gate passed against the version active now."""
    gate = latest_gate(version)
    return bool(
        gate and gate.status == GateStatus.PASSED and gate.baseline_number == baseline_number
    )


def _sample_query(
    project: Project, version: PolicyVersion, baseline: PolicyVersion
) -> QuerySet[Incident]:
    size = settings.METACLAW["REPLAY_GATE_SAMPLE_SIZE"]
    changed = version.revisions.exclude(pk__in=baseline.revisions.values("pk"))
    groups = list(changed.values_list("source_groups", flat=True).distinct())
    incidents = incidents_for_project(project).exclude(messages=[])
    if any(groups):
        incidents = incidents.filter(group_id__in=[g for g in groups if g])
    return incidents.order_by("-occurred_at")[:size]


def replay_sample(
    project: Project, version: PolicyVersion, baseline: PolicyVersion
) -> list[Incident]:
    """The recorded failing conversations to replay, newest first: those of the groups behind
    the revisions the candidate adds or changes; for a candidate that changes no skill (a new
    adapter), the project's newest incidents."""
    return list(_sample_query(project, version, baseline))


ACTIVE_GATE_STATUSES = (GateStatus.PENDING, GateStatus.RUNNING)


@dataclass(frozen=True)
class GateProgress:
    """Pairs replayed so far of the conversations sampled (the caps may stop it sooner)."""

    done: int
    total: int
    polling: bool

    @property
    def percent(self) -> int:
        return min(100, round(100 * self.done / self.total)) if self.total else 0


def gate_progress(gate: ReplayGate, project: Project) -> GateProgress:
    """How far ``gate`` (of ``project``) got: its judged pairs (the counters the worker saves
    after each pair) of the sample it replays. A gate in flight counts its sample again (a
    count query, the same selection the worker made); a finished one is as far as it went."""
    done = gate.wins + gate.ties + gate.losses
    if gate.status not in ACTIVE_GATE_STATUSES:
        return GateProgress(done=done, total=done, polling=False)
    baseline = PolicyVersion.objects.filter(project=project, number=gate.baseline_number).first()
    total = _sample_query(project, gate.version, baseline).count() if baseline else done
    return GateProgress(done=done, total=max(total, done), polling=True)
