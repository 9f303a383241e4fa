"""Measuring a skill's effect on live traffic, and flagging the live revisions that did not work.

Traffic is the project's recorded turns (``incidents.Trajectory``: the proxy's and the API's)
and the turns agents report as counts (``incidents.traffic``: agents without the proxy).
The figures compare the incidents of the groups a revision (or a version) was made for, per
1,000 turns, in a window before and after it went live (the first release that held it), and
the same for every other group: the harm check (``stats`` for the interval and the verdict)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from base.models import Project
from base.services import audit_record
from incidents import services as incident_services
from incidents import traffic
from incidents.models import Incident, IncidentGroup, Trajectory
from skills.approvals import notifications
from skills.effectiveness import stats
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, Release


def window_days() -> int:
    return int(settings.METACLAW.get("EFFECTIVENESS_WINDOW_DAYS", 7))


def thresholds() -> dict[str, int]:
    conf = settings.METACLAW
    return {
        "min_turns": int(conf.get("EFFECTIVENESS_MIN_TURNS", 1000)),
        "min_incidents": int(conf.get("EFFECTIVENESS_MIN_INCIDENTS", 10)),
    }


@dataclass(frozen=True)
class DayPoint:
    day: date
    incidents: int
    turns: int
    rate: float | None


@dataclass
class Measurement:
    """What the pages, the API and the check show for one subject."""

    subject: str  # "revision" | "version" | "group"
    activated_at: datetime | None
    window_days: int
    group_ids: list[int] | None  # None: every group (a version that only changed the adapter)
    target: stats.RateComparison
    others: stats.RateComparison | None
    series: list[DayPoint] = field(default_factory=list)
    marks: list[datetime] = field(default_factory=list)
    revisions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ineffective(self) -> bool:
        """Enough traffic, and the groups' rate did not fall."""
        return self.target.verdict in (stats.NO_CHANGE, stats.WORSE)

    @property
    def harmful(self) -> bool:
        """The other groups' rate rose with it."""
        return self.others is not None and self.others.verdict == stats.WORSE

    @property
    def verdict_label(self) -> str:
        return stats.VERDICT_LABELS[self.target.verdict]

    def as_dict(self, *, series: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "subject": self.subject,
            "activated_at": self.activated_at.isoformat() if self.activated_at else None,
            "window_days": self.window_days,
            "group_ids": self.group_ids,
            "method": "Poisson rate ratio (after/before) with a 95% Wilson interval on the "
            "conditional binomial share",
            **thresholds(),
            "target": self.target.as_dict(),
            "others": self.others.as_dict() if self.others else None,
            "verdict": self.target.verdict,
            "ineffective": self.ineffective,
            "harmful": self.harmful,
            "revisions": self.revisions,
        }
        if series:
            out["series"] = [
                {"day": p.day.isoformat(), "incidents": p.incidents, "turns": p.turns,
                 "rate": p.rate}
                for p in self.series
            ]  # fmt: skip
            out["marks"] = [mark.isoformat() for mark in self.marks]
        return out


# --- Reads -----------------------------------------------------------------------------------


def _with_merged(group_ids: list[int]) -> list[int]:
    """The groups, the groups they were merged into and the groups merged into them: a merge
    moves incidents, and the figures must follow them."""
    if not group_ids:
        return []
    rows = IncidentGroup.objects.filter(
        Q(pk__in=group_ids) | Q(merged_into_id__in=group_ids)
    ).values_list("pk", "merged_into_id")
    ids = set(group_ids)
    for pk, merged_into in rows:
        ids.add(pk)
        if merged_into:
            ids.add(merged_into)
    return sorted(ids)


def _turns(project: Project, start: datetime, end: datetime) -> int:
    """Recorded turns and the turns agents reported as counts (``incidents.traffic``)."""
    recorded = Trajectory.objects.filter(
        project=project, occurred_at__gte=start, occurred_at__lt=end
    ).count()
    return recorded + traffic.reported_turns(project, start, end)


def _in_groups(group_ids: list[int] | None) -> Q:
    return Q() if group_ids is None else Q(group_id__in=group_ids)


def _series(
    project: Project, group_ids: list[int] | None, start: datetime, end: datetime
) -> list[DayPoint]:
    """Incidents of the groups, turns (recorded and reported) and the rate per 1,000 turns per
    UTC day. Three queries."""
    day = TruncDate("occurred_at", tzinfo=UTC)
    turns = dict(
        Trajectory.objects.filter(project=project, occurred_at__gte=start, occurred_at__lt=end)
        .annotate(day=day)
        .values_list("day")
        .annotate(n=Count("pk"))
        .values_list("day", "n")
    )
    incidents = dict(
        Incident.objects.filter(_in_groups(group_ids), project=project)
        .filter(occurred_at__gte=start, occurred_at__lt=end)
        .annotate(day=day)
        .values_list("day")
        .annotate(n=Count("pk"))
        .values_list("day", "n")
    )
    reported = traffic.reported_turns_by_day(project, start, end)
    points = []
    current, last = start.astimezone(UTC).date(), end.astimezone(UTC).date()
    while current <= last:
        n, k = turns.get(current, 0) + reported.get(current, 0), incidents.get(current, 0)
        points.append(DayPoint(current, k, n, stats.per_thousand(k, n)))
        current += timedelta(days=1)
    return points


def _not_live() -> stats.RateComparison:
    return stats.RateComparison(0, 0, 0, 0, None, None, None, None, None, stats.NOT_LIVE)


def measure(
    *,
    project: Project,
    subject: str,
    group_ids: list[int] | None,
    activated_at: datetime | None,
    harm_check: bool = True,
    now: datetime | None = None,
) -> Measurement:
    """The before/after comparison around ``activated_at`` (windows of ``window_days``; the
    after window ends now while it is not over). Eight queries: three for the daily series,
    four for the turns (recorded and reported) on each side, one for the incidents."""
    now = now or timezone.now()
    days = window_days()
    width = timedelta(days=days)
    ids = None if group_ids is None else _with_merged(group_ids)
    if activated_at is None or activated_at > now:
        return Measurement(
            subject, None, days, ids, _not_live(), None,
            _series(project, ids, now - width, now),
        )  # fmt: skip
    start, end = activated_at - width, min(activated_at + width, now)
    before, after = Q(occurred_at__lt=activated_at), Q(occurred_at__gte=activated_at)
    mine = _in_groups(ids)
    counts = Incident.objects.filter(
        project=project, occurred_at__gte=start, occurred_at__lt=end
    ).aggregate(
        target_before=Count("pk", filter=mine & before),
        target_after=Count("pk", filter=mine & after),
        other_before=Count("pk", filter=~mine & before) if ids is not None else Count("pk"),
        other_after=Count("pk", filter=~mine & after) if ids is not None else Count("pk"),
    )
    turns_before, turns_after = (
        _turns(project, start, activated_at),
        _turns(project, activated_at, end),
    )
    limits = thresholds()
    target = stats.compare(
        incidents_before=counts["target_before"],
        turns_before=turns_before,
        incidents_after=counts["target_after"],
        turns_after=turns_after,
        **limits,
    )
    others = None
    if harm_check and ids is not None:
        others = stats.compare(
            incidents_before=counts["other_before"],
            turns_before=turns_before,
            incidents_after=counts["other_after"],
            turns_after=turns_after,
            **limits,
        )
    return Measurement(
        subject, activated_at, days, ids, target, others, _series(project, ids, start, end),
        [activated_at],
    )  # fmt: skip


def revision_activated_at(revision: SkillRevision) -> datetime | None:
    """When the revision went live: the first release to a version that holds it."""
    return (
        Release.objects.filter(to_version__revisions=revision)
        .order_by("created_at", "id")
        .values_list("created_at", flat=True)
        .first()
    )


def revision_effectiveness(
    project: Project, revision: SkillRevision, *, now: datetime | None = None
) -> Measurement:
    group_ids = list(revision.source_groups.values_list("pk", flat=True))
    return measure(
        project=project,
        subject="revision",
        group_ids=group_ids,
        activated_at=revision_activated_at(revision),
        now=now,
    )


def version_effectiveness(
    project: Project, version: PolicyVersion, *, now: datetime | None = None
) -> Measurement:
    """The groups of the revisions this version added to the one its first release replaced;
    a version that added none (a new adapter) is measured on every group, without harm check."""
    release = (
        Release.objects.filter(to_version=version)
        .order_by("created_at", "id")
        .values_list("created_at", "from_version_id")
        .first()
    )
    activated_at, replaced = release if release else (None, version.parent_id)
    held = set(version.revisions.values_list("pk", flat=True))
    if replaced:
        held -= set(
            PolicyVersion.revisions.through.objects.filter(policyversion_id=replaced).values_list(
                "skillrevision_id", flat=True
            )
        )
    group_ids: list[int] | None = sorted(
        set(
            SkillRevision.source_groups.through.objects.filter(
                skillrevision_id__in=held
            ).values_list("incidentgroup_id", flat=True)
        )
    )
    if not held:
        group_ids = None
    return measure(
        project=project,
        subject="version",
        group_ids=group_ids,
        activated_at=activated_at,
        harm_check=group_ids is not None,
        now=now,
    )


def group_effectiveness(
    project: Project, group: IncidentGroup, *, now: datetime | None = None
) -> Measurement:
    """The group's rate around the first time a skill made for it went live; every such
    activation is marked on the chart and listed in ``revisions``."""
    revisions = list(
        SkillRevision.objects.filter(source_groups=group, skill__project=project)
        .select_related("skill")
        .order_by("number")
    )
    live = []
    for revision in revisions:
        activated = revision_activated_at(revision)
        if activated is not None:
            live.append((activated, revision))
    live.sort(key=lambda pair: pair[0])
    first = live[0][0] if live else None
    measurement = measure(
        project=project, subject="group", group_ids=[group.pk], activated_at=first, now=now
    )
    measurement.marks = [activated for activated, _ in live]
    measurement.revisions = [
        {"id": r.pk, "skill": r.skill.slug, "number": r.number, "activated_at": a.isoformat()}
        for a, r in live
    ]
    return measurement


# --- The check ------------------------------------------------------------------------------


def _figures(comparison: stats.RateComparison) -> str:
    def rate(value: float | None) -> str:
        return "—" if value is None else f"{value:g}"

    return (
        f"{rate(comparison.rate_before)} → {rate(comparison.rate_after)} incidents per 1,000 "
        f"turns ({comparison.incidents_before}/{comparison.turns_before} before, "
        f"{comparison.incidents_after}/{comparison.turns_after} after)"
    )


def flag_reason(measurement: Measurement) -> str:
    """Why the revision goes back to the review queue, with the figures; empty when it
    should not."""
    reasons = []
    if measurement.ineffective:
        reasons.append(
            "Its groups' rate did not fall after it went live: " + _figures(measurement.target)
        )
    if measurement.harmful and measurement.others is not None:
        reasons.append("Other groups' rate rose when it went live: " + _figures(measurement.others))
    return " ".join(reasons)


def revision_effectiveness_check(
    *, revision_id: int, now: datetime | None = None
) -> Measurement | None:
    """Measure a live (APPROVED) revision and record the figures; an ineffective or harmful one
    is flagged once (back to the review queue, audited, reviewers notified) and, when its groups
    recurred, they are marked regressed. Idempotent: the row lock and ``effectiveness_flagged_at``
    make a second run record figures only. None when the revision is not APPROVED."""
    now = now or timezone.now()
    with transaction.atomic():
        revision = (
            SkillRevision.objects.select_for_update(of=("self",))
            .select_related("skill__project")
            .filter(pk=revision_id)
            .first()
        )
        if revision is None or revision.status != RevisionStatus.APPROVED:
            return None
        project = revision.skill.project
        measurement = revision_effectiveness(project, revision, now=now)
        revision.effectiveness = {
            **measurement.as_dict(series=False),
            "checked_at": now.isoformat(),
        }
        fields = ["effectiveness"]
        reason = flag_reason(measurement)
        if reason and revision.effectiveness_flagged_at is None:
            revision.effectiveness_flagged_at = now
            revision.effectiveness_flag_reason = reason
            fields += ["effectiveness_flagged_at", "effectiveness_flag_reason"]
            audit_record(
                action="skill_revision.effectiveness_flagged",
                project=project,
                obj=revision,
                after=revision.effectiveness,
                message=reason,
            )
            if measurement.ineffective:
                for group_id in measurement.group_ids or []:
                    incident_services.group_mark_regressed(
                        group_id=group_id,
                        reason=f"The skill '{revision.skill.slug}' went live and the group "
                        f"still recurs: {_figures(measurement.target)}.",
                    )
        revision.save(update_fields=fields)
        if "effectiveness_flagged_at" in fields:
            notifications.effectiveness_flag_notify(revision=revision)
    return measurement


def revisions_to_check(*, now: datetime | None = None) -> list[int]:
    """Live revisions not flagged yet that went live within the last four windows (older ones
    were judged, or never will be)."""
    now = now or timezone.now()
    since = now - timedelta(days=4 * window_days())
    recent = Release.objects.filter(created_at__gte=since).values("to_version_id")
    return list(
        SkillRevision.objects.filter(
            status=RevisionStatus.APPROVED,
            effectiveness_flagged_at__isnull=True,
            policy_versions__in=recent,
            source_groups__isnull=False,
        )
        .distinct()
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def effectiveness_check_all(*, now: datetime | None = None) -> int:
    """The periodic check: every recently live revision measured; returns how many were
    flagged now."""
    flagged = 0
    for revision_id in revisions_to_check(now=now):
        measurement = revision_effectiveness_check(revision_id=revision_id, now=now)
        if measurement is not None and flag_reason(measurement):
            flagged += 1
    return flagged
