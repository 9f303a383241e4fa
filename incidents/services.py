"""Incident and trajectory ingestion, grouping, and group state transitions.

Only these functions write incidents, groups and trajectories. The skills app moves a group
through the fast loop with the ``group_synthesis_*`` functions below.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.db import connection, models, transaction
from django.db.models import F
from django.utils import timezone
from pydantic import TypeAdapter

from base.models import Project
from base.sanitize import clean_json, clean_json_text, clean_text
from base.services import Conflict, DomainError, audit_record
from base.sql import columns, placeholders

from . import signals
from .fingerprint import FINGERPRINT_VERSION, fingerprint, tool_from_messages
from .models import (
    SEVERITY_RANK,
    GroupStatus,
    Incident,
    IncidentGroup,
    IncidentStatus,
    SynthesisStatus,
    Trajectory,
)
from .schemas import ChatMessage, IncidentIn, TrajectoryIn

# A client clock a little ahead of ours is normal; a timestamp far in the future is not.
MAX_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class IngestResult:
    incident_id: uuid.UUID
    client_id: str
    group_id: int
    status: str
    duplicate: bool


def _event_time(value: datetime | None, now: datetime) -> datetime:
    if value is None:
        return now
    if timezone.is_naive(value):
        value = value.replace(tzinfo=UTC)
    return min(value, now + MAX_CLOCK_SKEW)


def _title(error_type: str, message: str, kind: str, agent: str) -> str:
    first_line = message.strip().splitlines()[0] if message.strip() else ""
    if error_type and first_line:
        title = f"{error_type}: {first_line}"
    else:
        title = error_type or first_line or f"{kind.replace('_', ' ')} in {agent}"
    return title[:300]


@dataclass(slots=True)
class _NewIncident:
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


_MESSAGES = TypeAdapter(list[ChatMessage])


def _build_incident(project: Project, item: IncidentIn, now: datetime) -> _NewIncident:
    messages_json, messages = clean_json_text(
        _MESSAGES.dump_python(item.messages, exclude_none=True)
    )
    error_type = clean_text(item.error.type.strip())
    error_message = clean_text(item.error.message)
    tool = clean_text(
        item.error.tool if item.error.tool is not None else tool_from_messages(messages)
    )
    agent = clean_text(item.agent.name.strip())
    fp, normalized = fingerprint(
        agent=agent, kind=item.kind, error_type=error_type, message=error_message, tool=tool
    )
    feedback = item.feedback
    return _NewIncident(
        id=uuid.uuid4(),
        project_id=project.pk,
        client_id=clean_text(item.id),
        agent_name=agent,
        agent_version=clean_text(item.agent.version),
        policy_version=item.policy_version,
        kind=item.kind,
        severity=item.severity,
        error_type=error_type,
        error_message=error_message,
        tool_name=tool,
        messages=messages_json,
        tools=clean_json_text(item.tools)[0],
        feedback_text=clean_text(feedback.text) if feedback else "",
        feedback_score=feedback.score if feedback else None,
        reward=feedback.reward if feedback else None,
        metadata=clean_json_text(item.metadata)[0],
        session_id=clean_text(item.session_id),
        fingerprint=fp,
        normalized_message=normalized,
        occurred_at=_event_time(item.occurred_at, now),
        received_at=now,
    )


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
    fields = {f.column: f for f in model._meta.concrete_fields}
    columns = list(rows[0])
    json_columns = [c for c in columns if fields[c].get_internal_type() == "JSONField"]
    table = model._meta.db_table
    quote = connection.ops.quote_name
    column_list = ", ".join(quote(c) for c in columns)
    if connection.vendor == "postgresql":
        if json_columns:
            rows = [{**row, **{c: orjson.Fragment(row[c]) for c in json_columns}} for row in rows]
        types = ", ".join(f"{quote(c)} {fields[c].db_type(connection)}" for c in columns)
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


def _upsert_groups(
    project: Project, incidents: list[_NewIncident], now: datetime
) -> dict[str, dict]:
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
        inc: _NewIncident = agg["incident"]
        rows.append(
            {
                "project_id": project.pk,
                "fingerprint": fp,
                "fingerprint_version": FINGERPRINT_VERSION,
                "title": _title(inc.error_type, inc.error_message, inc.kind, inc.agent_name),
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
            regressed_at = CASE WHEN {old}.status = 'resolved'
                THEN EXCLUDED.created_at ELSE {old}.regressed_at END,
            status_changed_at = CASE WHEN {old}.status = 'resolved'
                THEN EXCLUDED.created_at ELSE {old}.status_changed_at END,
            status = CASE WHEN {old}.status = 'resolved' THEN 'regressed' ELSE {old}.status END,
            synthesis_requested_at = CASE WHEN {old}.synthesis_status = 'none'
                THEN EXCLUDED.created_at ELSE {old}.synthesis_requested_at END,
            synthesis_status = CASE WHEN {old}.synthesis_status = 'none'
                THEN 'waiting' ELSE {old}.synthesis_status END
        RETURNING id, fingerprint, regressed_at, synthesis_requested_at, created_at
        """,
    )
    result: dict[str, dict] = {}
    for group_id, fp, regressed_at, requested_at, created_at in returned:
        result[fp] = {
            "id": group_id,
            "regressed": _is_instant(regressed_at, now),
            "created": _is_instant(created_at, now),
            "awaits_synthesis": _is_instant(requested_at, now),
            "count": aggregates[fp]["count"],
        }
    return result


def _stored_incidents(project_id: int, client_ids: list[str]) -> dict[str, tuple]:
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


def _insert_incidents(incidents: list[_NewIncident]) -> set[uuid.UUID]:
    """INSERT ... ON CONFLICT (project, client id) DO NOTHING, returning the ids it stored.

    One statement instead of bulk_create plus a read-back: the rows a concurrent request
    stored first are simply not returned. ``incidents`` must be sorted by client id."""
    rows = [{name: getattr(inc, name) for name in _INCIDENT_ATTNAMES} for inc in incidents]
    returned = _insert_rows(
        Incident,
        rows,
        order_by="client_id",
        tail="ON CONFLICT (project_id, client_id) DO NOTHING RETURNING id",
    )
    return {_as_uuid(pk) for (pk,) in returned}


def incidents_ingest(
    *, project: Project, items: Sequence[IncidentIn], actor_label: str = ""
) -> list[IngestResult]:
    """Store validated incidents, grouped; idempotent by client id (per project).

    Returns one result per item, in order. A client id seen before (stored earlier, or earlier
    in the same batch) answers with the stored incident and stores nothing. Runs in its own
    transaction; groups that now wait for the fast loop are announced after commit."""
    now = timezone.now()
    results: list[IngestResult | None] = [None] * len(items)
    first_index: dict[str, int] = {}
    candidates: list[tuple[int, Incident]] = []
    for index, item in enumerate(items):
        if item.id in first_index:
            continue
        first_index[item.id] = index
        candidates.append((index, _build_incident(project, item, now)))

    existing = _stored_incidents(project.pk, [inc.client_id for _, inc in candidates])
    fresh = [(i, inc) for i, inc in candidates if inc.client_id not in existing]

    awaiting: list[int] = []
    with transaction.atomic():
        groups: dict[str, dict] = {}
        if fresh:
            groups = _upsert_groups(project, [inc for _, inc in fresh], now)
            for _, inc in fresh:
                inc.group_id = groups[inc.fingerprint]["id"]
            inserted = _insert_incidents(
                sorted((inc for _, inc in fresh), key=lambda inc: inc.client_id)
            )
            lost = [(i, inc) for i, inc in fresh if inc.id not in inserted]
            if lost:
                # Another request stored these client ids between our check and our insert:
                # take back the counts we added and answer with what that request stored.
                _uncount(groups, [inc for _, inc in lost])
                lost_ids = {inc.client_id for _, inc in lost}
                existing.update(_stored_incidents(project.pk, sorted(lost_ids)))
                fresh = [(i, inc) for i, inc in fresh if inc.client_id not in lost_ids]
            for fp_info in groups.values():
                if fp_info["regressed"]:
                    group = IncidentGroup(pk=fp_info["id"], project=project)
                    audit_record(
                        action="incident_group.regressed",
                        project=project,
                        actor_label=actor_label or "system",
                        obj=group,
                        before={"status": GroupStatus.RESOLVED},
                        after={"status": GroupStatus.REGRESSED},
                        message="A new incident arrived in a resolved group.",
                    )
            awaiting = [info["id"] for info in groups.values() if info["awaits_synthesis"]]
            if fresh:
                signals.incidents_ingested.send(
                    sender=Project,
                    project=project,
                    group_ids=sorted({inc.group_id for _, inc in fresh}),
                    incident_ids=[inc.id for _, inc in fresh],
                )
        if awaiting:
            ids = list(awaiting)
            transaction.on_commit(
                lambda: signals.groups_await_synthesis.send(sender=None, group_ids=ids),
                robust=True,
            )

    for index, inc in fresh:
        results[index] = IngestResult(inc.id, inc.client_id, inc.group_id, inc.status, False)
    for index, item in enumerate(items):
        if results[index] is None:
            client_id = clean_text(item.id)
            if client_id in existing:
                _, incident_id, group_id, status = existing[client_id]
            else:  # repeated inside this batch: the first occurrence's result
                first = results[first_index[item.id]]
                assert first is not None
                incident_id, group_id, status = first.incident_id, first.group_id, first.status
            results[index] = IngestResult(incident_id, client_id, group_id, status, True)
    return [r for r in results if r is not None]


def _uncount(groups: dict[str, dict], incidents: list[Incident]) -> None:
    per_group: dict[int, int] = {}
    for inc in incidents:
        per_group[inc.group_id] = per_group.get(inc.group_id, 0) + 1
    for group_id, count in per_group.items():
        IncidentGroup.objects.filter(pk=group_id).update(event_count=F("event_count") - count)


def trajectories_ingest(
    *, project: Project, items: Sequence[TrajectoryIn], source: str = "api"
) -> list[tuple[uuid.UUID, bool]]:
    """Store trajectories; idempotent by client id when one is given. Returns ``(id, duplicate)``
    per item, in order."""
    now = timezone.now()
    client_ids = [item.id for item in items if item.id]
    existing = dict(
        Trajectory.objects.filter(project=project, client_id__in=client_ids).values_list(
            "client_id", "id"
        )
    )
    out: list[tuple[uuid.UUID, bool]] = []
    new: list[Trajectory] = []
    seen: dict[str, uuid.UUID] = {}
    for item in items:
        if item.id and item.id in existing:
            out.append((existing[item.id], True))
            continue
        if item.id and item.id in seen:
            out.append((seen[item.id], True))
            continue
        trajectory = Trajectory(
            id=uuid.uuid4(),
            project=project,
            client_id=clean_text(item.id) if item.id else None,
            session_id=clean_text(item.session_id),
            turn_type=item.turn_type,
            source=source,
            agent_name=clean_text(item.agent.name) if item.agent else "",
            policy_version=item.policy_version,
            model=clean_text(item.model),
            messages=clean_json([m.model_dump(exclude_none=True) for m in item.messages]),
            tools=clean_json(item.tools),
            reward=item.reward,
            outcome=item.outcome,
            corrected_answer=clean_text(item.corrected_answer),
            metadata=clean_json(item.metadata),
            occurred_at=_event_time(item.occurred_at, now),
            received_at=now,
        )
        if item.id:
            seen[item.id] = trajectory.id
        new.append(trajectory)
        out.append((trajectory.id, False))
    with transaction.atomic():
        Trajectory.objects.bulk_create(new, ignore_conflicts=True)
    if any(t.client_id for t in new):
        stored = dict(
            Trajectory.objects.filter(
                project=project, client_id__in=[t.client_id for t in new if t.client_id]
            ).values_list("client_id", "id")
        )
        by_id = {t.id: t.client_id for t in new}
        out = [
            (stored[by_id[tid]], True)
            if by_id.get(tid) and stored.get(by_id[tid]) not in (None, tid)
            else (tid, dup)
            for tid, dup in out
        ]
    return out


def trajectories_store(*, trajectories: Sequence[Trajectory]) -> int:
    """Store trajectories built elsewhere (the runtime proxy's recorded turns, already cleaned
    and stamped) in one transaction. Returns how many were stored.

    On PostgreSQL the rows go in with one ``COPY``: Django's ``bulk_create`` escapes every JSON
    value into an array literal, several times the CPU for agent-sized message lists, and the
    proxy records turns in the web process."""
    if not trajectories:
        return 0
    if connection.vendor == "postgresql":
        _copy_rows(Trajectory, trajectories)
    else:
        with transaction.atomic():
            Trajectory.objects.bulk_create(trajectories)
    return len(trajectories)


def session_outcome_record(
    *, project: Project, session_id: str, outcome: str | None, reward: float | None
) -> int:
    """Stamp every recorded turn of a session with its outcome and/or reward (what an agent
    learns at the end of a conversation). Returns how many turns were updated."""
    changes: dict[str, Any] = {}
    if outcome is not None:
        changes["outcome"] = outcome
    if reward is not None:
        changes["reward"] = reward
    turns = Trajectory.objects.filter(project=project, session_id=session_id)
    return turns.update(**changes) if changes else 0


def _copy_rows(model: type[models.Model], rows: Sequence[models.Model]) -> None:
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


# --- Group status (people) ----------------------------------------------------------------

_GROUP_TRANSITIONS: dict[str, set[str]] = {
    GroupStatus.RESOLVED: {GroupStatus.UNRESOLVED, GroupStatus.REGRESSED, GroupStatus.IGNORED},
    GroupStatus.IGNORED: {GroupStatus.UNRESOLVED, GroupStatus.REGRESSED, GroupStatus.RESOLVED},
    GroupStatus.UNRESOLVED: {GroupStatus.RESOLVED, GroupStatus.IGNORED},
}

_INCIDENT_STATUS_FOR_GROUP = {
    GroupStatus.RESOLVED: IncidentStatus.RESOLVED,
    GroupStatus.IGNORED: IncidentStatus.IGNORED,
}


@transaction.atomic
def group_set_status(
    *, group: IncidentGroup, status: str, actor: Any, actor_label: str = ""
) -> IncidentGroup:
    """Resolve, ignore or reopen a group (a person's decision)."""
    group = IncidentGroup.objects.select_for_update().get(pk=group.pk)
    allowed_from = _GROUP_TRANSITIONS.get(status)
    if allowed_from is None:
        raise DomainError(f"Unknown group status '{status}'.", field="status")
    if group.status not in allowed_from:
        raise Conflict(f"The group is {group.status} already; it cannot become {status}.")
    before = group.status
    group.status = status
    group.status_changed_at = timezone.now()
    group.save(update_fields=["status", "status_changed_at"])
    if status in _INCIDENT_STATUS_FOR_GROUP:
        group.incidents.exclude(status=_INCIDENT_STATUS_FOR_GROUP[status]).update(
            status=_INCIDENT_STATUS_FOR_GROUP[status]
        )
    audit_record(
        action=f"incident_group.{status}",
        project=group.project,
        actor=actor,
        actor_label=actor_label,
        obj=group,
        before={"status": before},
        after={"status": status},
    )
    return group


@transaction.atomic
def group_mark_regressed(*, group_id: int, reason: str) -> bool:
    """Mark a group regressed (e.g. its approved skill did not prevent a new incident).
    Returns False when it was regressed already."""
    group = IncidentGroup.objects.select_for_update().get(pk=group_id)
    if group.status == GroupStatus.REGRESSED:
        return False
    before = group.status
    now = timezone.now()
    group.status = GroupStatus.REGRESSED
    group.regressed_at = now
    group.status_changed_at = now
    group.save(update_fields=["status", "regressed_at", "status_changed_at"])
    audit_record(
        action="incident_group.regressed",
        project=group.project,
        obj=group,
        before={"status": before},
        after={"status": GroupStatus.REGRESSED},
        message=reason,
    )
    return True


# --- Fast-loop outbox (driven by the skills app) ------------------------------------------


def group_request_synthesis(*, group_id: int, from_statuses: Sequence[str]) -> bool:
    """Put a group back in the fast loop's queue (WAITING) if it is in one of
    ``from_statuses``; announce it after commit. Returns whether it changed."""
    now = timezone.now()
    changed = IncidentGroup.objects.filter(pk=group_id, synthesis_status__in=from_statuses).update(
        synthesis_status=SynthesisStatus.WAITING, synthesis_requested_at=now, synthesis_error=""
    )
    if changed:
        transaction.on_commit(
            lambda: signals.groups_await_synthesis.send(sender=None, group_ids=[group_id]),
            robust=True,
        )
    return bool(changed)


def group_synthesis_claim(*, group_id: int) -> IncidentGroup | None:
    """Claim a WAITING group for one worker (WAITING → RUNNING). Exactly one caller wins and
    gets the group as stored by its claim; the others get None. The claim is stamped
    (``synthesis_claimed_at``): a RUNNING group is stale by when it was claimed, not by when it
    was requested (it may have waited long before its claim).

    One statement, the claim and the read together (``RETURNING``), written out: it starts
    every synthesis, and the ORM's update and select cost more CPU than PostgreSQL's run."""
    claimed = list(
        IncidentGroup.objects.raw(
            f"UPDATE {IncidentGroup._meta.db_table} SET synthesis_status = %s, "
            "synthesis_attempts = synthesis_attempts + 1, synthesis_claimed_at = %s "
            f"WHERE id = %s AND synthesis_status = %s RETURNING {columns(IncidentGroup)}",
            [
                SynthesisStatus.RUNNING.value,
                connection.ops.adapt_datetimefield_value(timezone.now()),
                group_id,
                SynthesisStatus.WAITING.value,
            ],
        )
    )
    return claimed[0] if claimed else None


def group_synthesis_finish(
    *, group_id: int, status: str, error: str = "", from_status: str = SynthesisStatus.RUNNING
) -> bool:
    """Record the outcome of a synthesis (RUNNING → PROPOSED | NO_SKILL | NEEDS_SKILL | FAILED
    | BUDGET) and mark the group's incidents accordingly."""
    if status not in SynthesisStatus.values or status in (SynthesisStatus.NONE,):
        raise DomainError(f"Unknown synthesis status '{status}'.")
    with transaction.atomic(savepoint=False):  # nested in the fast loop's transaction
        # One conditional UPDATE is the check and the change: it takes the row lock, and a
        # group that left ``from_status`` meanwhile matches nothing. Written out, as the claim.
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {IncidentGroup._meta.db_table} SET synthesis_status = %s, "
                "synthesis_error = %s, events_at_synthesis = event_count "
                "WHERE id = %s AND synthesis_status = %s",
                [status, error, group_id, from_status],
            )
            if cursor.rowcount != 1:
                return False
            incident_status = {
                SynthesisStatus.PROPOSED: IncidentStatus.PROPOSED,
                SynthesisStatus.NO_SKILL: IncidentStatus.NO_SKILL,
                SynthesisStatus.FAILED: IncidentStatus.FAILED,
            }.get(status)
            if incident_status:
                cursor.execute(
                    f"UPDATE {Incident._meta.db_table} SET status = %s "
                    "WHERE group_id = %s AND status IN (%s, %s)",
                    [
                        incident_status.value,
                        group_id,
                        IncidentStatus.NEW.value,
                        IncidentStatus.ANALYZING.value,
                    ],
                )
    return True


def groups_waiting_for_synthesis(*, older_than_seconds: int) -> list[int]:
    """Groups WAITING for longer than the given age (the sweep re-enqueues them), plus RUNNING
    groups whose worker died (no progress for ten times that age)."""
    now = timezone.now()
    waiting = IncidentGroup.objects.filter(
        synthesis_status=SynthesisStatus.WAITING,
        synthesis_requested_at__lt=now - timedelta(seconds=older_than_seconds),
    ).values_list("id", flat=True)[:500]
    return list(waiting)
