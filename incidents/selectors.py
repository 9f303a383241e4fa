"""Tenant-scoped reads of incidents, groups and trajectories, shared by the API and pages."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, QuerySet
from django.db.models.functions import TruncDate
from django.utils import timezone

from base.errors import NotFound
from base.models import Project
from incidents.models import Incident, IncidentGroup, Trajectory


def incidents_for_project(
    project: Project,
    *,
    status: str | None = None,
    kind: str | None = None,
    agent: str | None = None,
    group_id: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[Incident]:
    qs = Incident.objects.filter(project=project)
    if status:
        qs = qs.filter(status=status)
    if kind:
        qs = qs.filter(kind=kind)
    if agent:
        qs = qs.filter(agent_name=agent)
    if group_id:
        qs = qs.filter(group_id=group_id)
    if since:
        qs = qs.filter(occurred_at__gte=since)
    if until:
        qs = qs.filter(occurred_at__lt=until)
    return qs


def groups_for_project(
    project: Project,
    *,
    status: str | None = None,
    kind: str | None = None,
    agent: str | None = None,
    synthesis_status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[IncidentGroup]:
    qs = IncidentGroup.objects.filter(project=project)
    if status:
        qs = qs.filter(status=status)
    if kind:
        qs = qs.filter(kind=kind)
    if agent:
        qs = qs.filter(agent_name=agent)
    if synthesis_status:
        qs = qs.filter(synthesis_status=synthesis_status)
    if since:
        qs = qs.filter(last_seen__gte=since)
    if until:
        qs = qs.filter(last_seen__lt=until)
    return qs


def incident_for_project(project: Project, incident_id: Any) -> Incident:
    incident = Incident.objects.filter(project=project, pk=incident_id).first()
    if incident is None:
        raise NotFound("No such incident in this project.")
    return incident


def group_for_project(project: Project, group_id: int) -> IncidentGroup:
    group = IncidentGroup.objects.filter(project=project, pk=group_id).first()
    if group is None:
        raise NotFound("No such incident group in this project.")
    return group


def trajectories_for_project(project: Project) -> QuerySet[Trajectory]:
    return Trajectory.objects.filter(project=project)


def daily_counts(group_ids: list[int], *, days: int = 14) -> dict[int, list[int]]:
    """Incidents per day for each group over the last ``days`` days (oldest first), in one
    query whatever the number of groups: the sparklines of the group list."""
    today = timezone.now().date()
    start = today - timedelta(days=days - 1)
    series = {gid: [0] * days for gid in group_ids}
    if not group_ids:
        return series
    rows = (
        Incident.objects.filter(
            group_id__in=group_ids,
            occurred_at__gte=timezone.make_aware(datetime.combine(start, datetime.min.time())),
        )
        .annotate(day=TruncDate("occurred_at"))
        .values("group_id", "day")
        .annotate(n=Count("id"))
    )
    for row in rows:
        index = (row["day"] - start).days
        if 0 <= index < days:
            series[row["group_id"]][index] = row["n"]
    return series


def agents_for_project(project: Project) -> list[str]:
    return list(
        IncidentGroup.objects.filter(project=project)
        .order_by("agent_name")
        .values_list("agent_name", flat=True)
        .distinct()
    )
