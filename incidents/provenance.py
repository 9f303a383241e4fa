"""Reads of where incidents come from: how many distinct sessions, end users, agents, API keys
and sources stand behind groups (a proposal's provenance), and the sessions and end users a
person marked abusive (``incidents.services.abusive_source_mark``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import connection
from django.db.models import Exists, OuterRef, Q, QuerySet

from base.errors import NotFound
from base.models import Project
from incidents.models import AbusiveSource, AbusiveSourceKind, Incident

# An incident's source: its end user when the agent names one, else its session, else the API
# key that reported it, else "unknown" (all that name none count as one source, so leaving the
# names out never adds sources). Written out, with the counts below: the ORM's expression of
# them (``benchmarks/synthesis_cost.py`` keeps it, checks both agree and times both) cost more
# Python CPU to compile than any other query of a synthesis, about 3 ms against 0.3.
_SOURCE_KEY = (
    "CASE WHEN end_user <> '' THEN 'user:' || end_user "
    "WHEN session_id <> '' THEN 'session:' || session_id "
    "WHEN api_key_id IS NOT NULL THEN 'key:' || CAST(api_key_id AS TEXT) "
    "ELSE 'unknown' END"
)
_COUNTS = (
    ("incidents", "COUNT(id)"),
    ("sessions", "COUNT(DISTINCT CASE WHEN session_id <> '' THEN session_id END)"),
    ("end_users", "COUNT(DISTINCT CASE WHEN end_user <> '' THEN end_user END)"),
    ("agents", "COUNT(DISTINCT agent_name)"),
    ("api_keys", "COUNT(DISTINCT api_key_id)"),
    ("sources", f"COUNT(DISTINCT {_SOURCE_KEY})"),
)


def groups_provenance(group_ids: Any) -> dict[str, Any]:
    """Distinct sessions, end users (when agents report them), agents, API keys and sources
    (the end user, else the session, else the key) behind the incidents of ``group_ids`` (ids,
    or a query of them), in one query. ``single_source``: one source or none."""
    if isinstance(group_ids, QuerySet):
        subquery, params = group_ids.values("pk").query.sql_with_params()
        where, params = f"group_id IN ({subquery})", list(params)
    else:
        ids = [int(pk) for pk in group_ids]
        where, params = f"group_id IN ({', '.join(['%s'] * len(ids)) or 'NULL'})", ids
    select = ", ".join(sql for _, sql in _COUNTS)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {select} FROM {Incident._meta.db_table} WHERE {where}", params)
        row = cursor.fetchone()
    counts = {name: int(value or 0) for (name, _), value in zip(_COUNTS, row, strict=True)}
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
