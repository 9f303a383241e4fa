"""Tenant-scoped reads of incidents, groups and trajectories, shared by the API and pages."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.db.models import Count, QuerySet
from django.db.models.functions import TruncDate
from django.utils import timezone

from base.errors import NotFound
from base.models import Project
from incidents.models import Incident, IncidentGroup, Trajectory

_Row = TypeVar("_Row", Incident, IncidentGroup)


def _narrowed(
    qs: QuerySet[_Row],
    equal_to: dict[str, Any],
    time_field: str,
    since: datetime | None,
    until: datetime | None,
) -> QuerySet[_Row]:
    """``qs`` narrowed to the fields in ``equal_to`` that were given (an empty filter matches
    everything, as it does in the query string) and to ``since <= time_field < until``."""
    conditions = {field: value for field, value in equal_to.items() if value}
    if since:
        conditions[f"{time_field}__gte"] = since
    if until:
        conditions[f"{time_field}__lt"] = until
    return qs.filter(**conditions)


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
    equal_to = {"status": status, "kind": kind, "agent_name": agent, "group_id": group_id}
    return _narrowed(
        Incident.objects.filter(project=project), equal_to, "occurred_at", since, until
    )


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
    equal_to = {
        "status": status,
        "kind": kind,
        "agent_name": agent,
        "synthesis_status": synthesis_status,
    }
    return _narrowed(
        IncidentGroup.objects.filter(project=project), equal_to, "last_seen", since, until
    )


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
