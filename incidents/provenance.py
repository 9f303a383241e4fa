"""Reads of where incidents come from: how many distinct sessions, end users, agents, API keys
and sources stand behind groups (a proposal's provenance), and the sessions and end users a
person marked abusive (``incidents.services.abusive_source_mark``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db.models import Case, CharField, Count, Exists, OuterRef, Q, Value, When
from django.db.models.functions import Cast, Concat

from base.errors import NotFound
from base.models import Project
from incidents.models import AbusiveSource, AbusiveSourceKind, Incident


def _source_key() -> Case:
    """An incident's source: its end user when the agent names one, else its session, else the
    API key that reported it, else "unknown" (one source for all that name none)."""
    return Case(
        When(~Q(end_user=""), then=Concat(Value("user:"), "end_user")),
        When(~Q(session_id=""), then=Concat(Value("session:"), "session_id")),
        When(
            api_key_id__isnull=False,
            then=Concat(Value("key:"), Cast("api_key_id", output_field=CharField())),
        ),
        # Nothing names its source: all such incidents count as one, so leaving the names out
        # never adds sources.
        default=Value("unknown"),
        output_field=CharField(),
    )


def groups_provenance(group_ids: Any) -> dict[str, Any]:
    """Distinct sessions, end users (when agents report them), agents, API keys and sources
    (``_source_key``) behind the incidents of ``group_ids`` (ids, or a query of them), in one
    query. ``single_source``:
    one source or none."""
    counts = Incident.objects.filter(group_id__in=group_ids).aggregate(
        incidents=Count("id"),
        sessions=Count("session_id", distinct=True, filter=~Q(session_id="")),
        end_users=Count("end_user", distinct=True, filter=~Q(end_user="")),
        agents=Count("agent_name", distinct=True),
        api_keys=Count("api_key_id", distinct=True),
        sources=Count(_source_key(), distinct=True),
    )
    return {**counts, "single_source": counts["sources"] <= 1}


def abusive_sources_for_project(project: Project | int) -> list[AbusiveSource]:
    return list(AbusiveSource.objects.filter(project=project).select_related("marked_by"))


def abusive_source_for_project(project: Project, mark_id: Any) -> AbusiveSource:
    """One mark of ``project`` (NotFound for another project's or none)."""
    mark = AbusiveSource.objects.filter(project=project, pk=mark_id).first()
    if mark is None:
        raise NotFound("No such abusive source in this project.")
    return mark


def abusive_marks_of(
    project: Project, *, sessions: Iterable[str], end_users: Iterable[str]
) -> dict[tuple[str, str], AbusiveSource]:
    """The marks on these sessions and end users, by (kind, value), with who marked them.
    One query (none when there is nothing to look up)."""
    sessions, end_users = {s for s in sessions if s}, {u for u in end_users if u}
    if not sessions and not end_users:
        return {}
    marks = AbusiveSource.objects.filter(project=project).filter(
        Q(kind=AbusiveSourceKind.SESSION, value__in=sessions)
        | Q(kind=AbusiveSourceKind.END_USER, value__in=end_users)
    )
    return {(m.kind, m.value): m for m in marks.select_related("marked_by")}


def abusive_values(project: Project) -> dict[str, set[str]]:
    """The marked sessions and end users of a project, by kind (the dataset build drops them)."""
    marked: dict[str, set[str]] = {kind: set() for kind in AbusiveSourceKind.values}
    for kind, value in AbusiveSource.objects.filter(project=project).values_list("kind", "value"):
        marked[kind].add(value)
    return marked


def abusive_sources_in_groups(project: Project | int, group_ids: Any) -> list[AbusiveSource]:
    """The abusive marks whose session or end user reported incidents in ``group_ids`` (ids,
    or a query of them): a proposal built on these groups is flagged. One query."""
    incidents = Incident.objects.filter(group_id__in=group_ids)
    by_session = incidents.filter(session_id=OuterRef("value"))
    by_end_user = incidents.filter(end_user=OuterRef("value"))
    return list(
        AbusiveSource.objects.filter(project=project)
        .annotate(_session=Exists(by_session), _end_user=Exists(by_end_user))
        .filter(
            Q(kind=AbusiveSourceKind.SESSION, _session=True)
            | Q(kind=AbusiveSourceKind.END_USER, _end_user=True)
        )
    )
