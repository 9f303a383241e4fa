"""The written-out SQL of batch ingestion: rows go to PostgreSQL as one JSON parameter
(``json_to_recordset``) or by COPY, and to SQLite (the embedded mode) as multi-row VALUES.
``benchmarks/ingest.py`` measures what it buys."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from django.db import connection, models, transaction
from django.utils import timezone

from base.models import Project
from base.sql import placeholders
from incidents.fingerprint import FINGERPRINT_VERSION
from incidents.models import (
    SEVERITY_RANK,
    GroupStatus,
    Incident,
    IncidentGroup,
    IncidentStatus,
    SynthesisStatus,
)


def incident_title(error_type: str, message: str, kind: str, agent: str) -> str:
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    if error_type and first_line:
        title = f"{error_type}: {first_line}"
    else:
        title = error_type or first_line or f"{kind.replace('_', ' ')} in {agent}"
    return title[:300]


@dataclass(slots=True)
class NewIncident:
    """An incident about to be stored, as the insert takes it: attributes named after
    ``Incident``'s columns (JSON columns hold JSON text), plus the normalised message its group
    needs. Cheaper to build than a model instance, and nothing here needs one."""

    id: uuid.UUID
    project_id: int
    client_id: str
    agent_name: str
    agent_version: str
    policy_version: int | None
    kind: str
    severity: str
    error_type: str
    error_message: str
    tool_name: str
    messages: str
    tools: str
    feedback_text: str
    feedback_score: float | None
    reward: float | None
    metadata: str
    session_id: str
    fingerprint: str
    normalized_message: str
    occurred_at: datetime
    received_at: datetime
    group_id: int | None = None
    status: str = IncidentStatus.NEW.value
    task: str = ""
    outcome: str = ""
    expected_outcome: str = ""
    end_user: str = ""
    api_key_id: int | None = None


# The synthesis states a new incident moves to WAITING.
_ASKS_AGAIN = (SynthesisStatus.NONE.value, SynthesisStatus.SOURCES.value)

_SEVERITY_SQL = (
    "CASE {col} "
    + " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in SEVERITY_RANK.items())
    + " ELSE 0 END"
)


def _is_instant(value: Any, instant: datetime) -> bool:
    """Whether a timestamp read back from a raw cursor is ``instant``. PostgreSQL returns an
    aware datetime; SQLite a naive UTC datetime or its text, depending on the column."""
    if value is None:
        return False
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return False
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return value == instant


def _as_uuid(value: Any) -> uuid.UUID:
    # SQLite hands back UUIDs as hex strings, PostgreSQL as UUID objects.
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


# Rows per INSERT on SQLite, whose statements take a bounded number of parameters.
_SQLITE_CHUNK = 500


def _sqlite_value(value: Any) -> Any:
    # What UUIDField and DateTimeField store on SQLite: hex text and naive UTC text.
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, datetime):
        return connection.ops.adapt_datetimefield_value(value)
    return value


@functools.lru_cache(maxsize=64)
def _column_sql(
    model: type[models.Model], columns: tuple[str, ...], vendor: str
) -> tuple[str, list[str], str]:
    """The column list, the JSON columns and the typed record definition of an insert, made
    once per model and columns: building the column types cost a good part of a single
    ingest's Python CPU (``benchmarks/ingest_orm.py``)."""
    fields = {f.column: f for f in model._meta.concrete_fields}
    quote = connection.ops.quote_name
    json_columns = [c for c in columns if fields[c].get_internal_type() == "JSONField"]
    types = ", ".join(f"{quote(c)} {fields[c].db_type(connection)}" for c in columns)
    return ", ".join(quote(c) for c in columns), json_columns, types


def _insert_rows(
    model: type[models.Model], rows: list[dict[str, Any]], *, order_by: str, tail: str
) -> list:
    """``INSERT INTO <model's table> (<rows' columns>) ... <tail>`` and what its RETURNING
    gives. ``rows`` are dicts of column values, already sorted by ``order_by``: concurrent
    statements then take their row locks in the same order and cannot deadlock each other.

    PostgreSQL reads the rows from one JSON parameter (``json_to_recordset``, typed from the
    model's columns; JSON columns hold JSON text and are passed through as JSON): psycopg's
    client-side binding then has one placeholder to find and one string to quote, where a
    multi-row VALUES list cost it more CPU than the rest of the ingest. SQLite gets that
    VALUES list, in chunks."""
    columns = list(rows[0])
    table = model._meta.db_table
    column_list, json_columns, types = _column_sql(model, tuple(columns), connection.vendor)
    quote = connection.ops.quote_name
    if connection.vendor == "postgresql":
        if json_columns:
            rows = [{**row, **{c: orjson.Fragment(row[c]) for c in json_columns}} for row in rows]
        sql = (
            f"INSERT INTO {table} ({column_list}) SELECT {column_list} "
            f"FROM json_to_recordset(%s::json) AS r({types}) ORDER BY {quote(order_by)} {tail}"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [orjson.dumps(rows).decode()])
            return cursor.fetchall()
    returned: list = []
    for start in range(0, len(rows), _SQLITE_CHUNK):
        chunk = rows[start : start + _SQLITE_CHUNK]
        params = [_sqlite_value(value) for row in chunk for value in row.values()]
        placeholders = "(" + ", ".join(["%s"] * len(columns)) + ")"
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({column_list}) "
                f"VALUES {', '.join([placeholders] * len(chunk))} {tail}",
                params,
            )
            returned.extend(cursor.fetchall())
    return returned


def upsert_groups(project: Project, incidents: list[NewIncident], now: datetime) -> dict[str, dict]:
    """Create or update one group per fingerprint in a single statement.

    Concurrent ingests of the same new fingerprint meet at the unique constraint and the loser
    updates the winner's row, so counts are never lost. Returns, per fingerprint, the group id,
    and whether this statement moved it to REGRESSED or to WAITING (we compare the returned
    timestamps with the one we passed: only this statement writes exactly that value)."""
    aggregates: dict[str, dict[str, Any]] = {}
    for incident in incidents:
        agg = aggregates.get(incident.fingerprint)
        if agg is None:
            aggregates[incident.fingerprint] = {
                "incident": incident,
                "count": 1,
                "first": incident.occurred_at,
                "last": incident.occurred_at,
                "severity": incident.severity,
            }
        else:
            agg["count"] += 1
            agg["first"] = min(agg["first"], incident.occurred_at)
            agg["last"] = max(agg["last"], incident.occurred_at)
            if SEVERITY_RANK[incident.severity] > SEVERITY_RANK[agg["severity"]]:
                agg["severity"] = incident.severity

    rows: list[dict[str, Any]] = []
    for fp, agg in sorted(aggregates.items()):
        inc: NewIncident = agg["incident"]
        rows.append(
            {
                "project_id": project.pk,
                "fingerprint": fp,
                "fingerprint_version": FINGERPRINT_VERSION,
                "title": incident_title(
                    inc.error_type, inc.error_message or inc.feedback_text, inc.kind, inc.agent_name
                ),
                "agent_name": inc.agent_name,
                "kind": inc.kind,
                "error_type": inc.error_type,
                "tool_name": inc.tool_name,
                "normalized_message": inc.normalized_message,
                "severity": agg["severity"],
                "event_count": agg["count"],
                "first_seen": agg["first"],
                "last_seen": agg["last"],
                "status": GroupStatus.UNRESOLVED.value,
                "status_changed_at": None,
                "synthesis_status": SynthesisStatus.WAITING.value,
                "synthesis_requested_at": now,
                "synthesis_error": "",
                "synthesis_attempts": 0,
                "events_at_synthesis": 0,
                "created_at": now,
            }
        )
    old = IncidentGroup._meta.db_table
    # A group merged into another keeps its row as an alias: its status and fast-loop state no
    # longer move; what arrives for it is counted on the group it was merged into.
    live = f"{old}.merged_into_id IS NULL"
    # A group with no synthesis yet, or one that waits for more distinct sources, asks again.
    asks = ", ".join(f"'{status}'" for status in _ASKS_AGAIN)
    returned = _insert_rows(
        IncidentGroup,
        rows,
        order_by="fingerprint",
        tail=f"""
        ON CONFLICT (project_id, fingerprint) DO UPDATE SET
            event_count = {old}.event_count + EXCLUDED.event_count,
            first_seen = CASE WHEN EXCLUDED.first_seen < {old}.first_seen
                THEN EXCLUDED.first_seen ELSE {old}.first_seen END,
            last_seen = CASE WHEN EXCLUDED.last_seen > {old}.last_seen
                THEN EXCLUDED.last_seen ELSE {old}.last_seen END,
            severity = CASE WHEN {_SEVERITY_SQL.format(col="EXCLUDED.severity")}
                > {_SEVERITY_SQL.format(col=f"{old}.severity")}
                THEN EXCLUDED.severity ELSE {old}.severity END,
            regressed_at = CASE WHEN {old}.status = 'resolved' AND {live}
                THEN EXCLUDED.created_at ELSE {old}.regressed_at END,
            status_changed_at = CASE WHEN {old}.status = 'resolved' AND {live}
                THEN EXCLUDED.created_at ELSE {old}.status_changed_at END,
            status = CASE WHEN {old}.status = 'resolved' AND {live}
                THEN 'regressed' ELSE {old}.status END,
            synthesis_requested_at = CASE WHEN {old}.synthesis_status IN ({asks}) AND {live}
                THEN EXCLUDED.created_at ELSE {old}.synthesis_requested_at END,
            synthesis_status = CASE WHEN {old}.synthesis_status IN ({asks}) AND {live}
                THEN 'waiting' ELSE {old}.synthesis_status END
        RETURNING id, fingerprint, regressed_at, synthesis_requested_at, created_at,
            merged_into_id
        """,
    )
    result: dict[str, dict] = {}
    merged: dict[str, int] = {}
    for group_id, fp, regressed_at, requested_at, created_at, merged_into in returned:
        if merged_into is not None:
            merged[fp] = merged_into
            continue
        result[fp] = {
            "id": group_id,
            "regressed": _is_instant(regressed_at, now),
            "created": _is_instant(created_at, now),
            "awaits_synthesis": _is_instant(requested_at, now),
            "count": aggregates[fp]["count"],
        }
    if merged:
        result.update(_count_on_merged_groups(merged, aggregates, now))
    return result


def _count_on_merged_groups(
    merged: dict[str, int], aggregates: dict[str, dict[str, Any]], now: datetime
) -> dict[str, dict]:
    """Incidents that arrived with the fingerprint of a merged group go to the group it was
    merged into, as in Sentry. Rare (only merged fingerprints take this path), so the ORM."""
    result: dict[str, dict] = {}
    roots = {
        group.pk: group
        for group in IncidentGroup.objects.select_for_update()
        .filter(pk__in=sorted(set(merged.values())))
        .order_by("pk")
    }
    for fp, root_id in sorted(merged.items()):
        root, agg = roots[root_id], aggregates[fp]
        root.event_count += agg["count"]
        root.first_seen = min(root.first_seen, agg["first"])
        root.last_seen = max(root.last_seen, agg["last"])
        if SEVERITY_RANK[agg["severity"]] > SEVERITY_RANK[root.severity]:
            root.severity = agg["severity"]
        regressed = root.status == GroupStatus.RESOLVED
        if regressed:
            root.status = GroupStatus.REGRESSED
            root.regressed_at = root.status_changed_at = now
        awaits = root.synthesis_status in _ASKS_AGAIN
        if awaits:
            root.synthesis_status = SynthesisStatus.WAITING
            root.synthesis_requested_at = now
        previous = result.get(fp)
        result[fp] = {
            "id": root.pk,
            "regressed": regressed or bool(previous and previous["regressed"]),
            "created": False,
            "awaits_synthesis": awaits or bool(previous and previous["awaits_synthesis"]),
            "count": agg["count"],
        }
    IncidentGroup.objects.bulk_update(list(roots.values()), GROUP_COUNTED_FIELDS)
    return result


# What counting new incidents on an existing group changes (``benchmarks/ingest_orm.py``, the
# ORM twin this module is measured against, updates the same).
GROUP_COUNTED_FIELDS = [
    "event_count",
    "first_seen",
    "last_seen",
    "severity",
    "status",
    "regressed_at",
    "status_changed_at",
    "synthesis_status",
    "synthesis_requested_at",
]


def stored_incidents(project_id: int, client_ids: list[str]) -> dict[str, tuple]:
    """``client_id -> (client_id, id, group_id, status)`` of the stored incidents.

    Plain SQL because it runs twice on every ingest: building the same query through the ORM
    cost more CPU than PostgreSQL spent answering it. On PostgreSQL the ids travel as one JSON
    parameter (one placeholder for psycopg to bind, and the unique index still serves)."""
    if not client_ids:
        return {}
    table = Incident._meta.db_table
    if connection.vendor == "postgresql":
        sql = (
            f"SELECT client_id, id, group_id, status FROM {table} WHERE project_id = %s "
            "AND client_id = ANY(ARRAY(SELECT json_array_elements_text(%s::json)))"
        )
        params: list[Any] = [project_id, orjson.dumps(client_ids).decode()]
    else:
        sql = (
            f"SELECT client_id, id, group_id, status FROM {table} "
            f"WHERE project_id = %s AND client_id IN ({placeholders(client_ids)})"
        )
        params = [project_id, *client_ids]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    return {cid: (cid, _as_uuid(pk), group_id, status) for cid, pk, group_id, status in rows}


_INCIDENT_ATTNAMES = [f.attname for f in Incident._meta.concrete_fields]


def insert_incidents(incidents: list[NewIncident]) -> set[uuid.UUID]:
    """INSERT ... ON CONFLICT DO NOTHING, returning the ids it stored: the conflict is a client
    id stored already, unique per project (per partition of the project, on a table partitioned
    by time, ``incidents.partitions``: there no unique key can name these columns alone, hence
    no conflict target here).

    One statement instead of bulk_create plus a read-back: the rows a concurrent request
    stored first are simply not returned. ``incidents`` must be sorted by client id."""
    rows = [{name: getattr(inc, name) for name in _INCIDENT_ATTNAMES} for inc in incidents]
    returned = _insert_rows(
        Incident,
        rows,
        order_by="client_id",
        tail="ON CONFLICT DO NOTHING RETURNING id",
    )
    return {_as_uuid(pk) for (pk,) in returned}


def copy_rows(model: type[models.Model], rows: Sequence[models.Model]) -> None:
    fields = list(model._meta.concrete_fields)
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)
    json_fields = [isinstance(f, models.JSONField) for f in fields]
    with transaction.atomic(), connection.cursor() as cursor:
        with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                values = []
                for f, is_json in zip(fields, json_fields, strict=True):
                    value = getattr(row, f.attname)
                    if is_json and value is not None:
                        value = orjson.dumps(value).decode()
                    values.append(value)
                copy.write_row(values)
