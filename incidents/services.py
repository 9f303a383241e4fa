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

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from metaclaw_site.models import Project
from metaclaw_site.sanitize import clean_json, clean_text
from metaclaw_site.services import Conflict, DomainError, audit_record

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
from .schemas import IncidentIn, TrajectoryIn

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


def _build_incident(project: Project, item: IncidentIn, now: datetime) -> Incident:
    messages = clean_json([m.model_dump(exclude_none=True) for m in item.messages])
    error_type = clean_text(item.error.type.strip())
    error_message = clean_text(item.error.message)
    tool = clean_text(
        item.error.tool if item.error.tool is not None else tool_from_messages(messages)
    )
    agent = clean_text(item.agent.name.strip())
    fp, _ = fingerprint(
        agent=agent, kind=item.kind, error_type=error_type, message=error_message, tool=tool
    )
    feedback = item.feedback
    return Incident(
        id=uuid.uuid4(),
        project=project,
        client_id=clean_text(item.id),
        agent_name=agent,
        agent_version=clean_text(item.agent.version),
        policy_version=item.policy_version,
        kind=item.kind,
        severity=item.severity,
        error_type=error_type,
        error_message=error_message,
        tool_name=tool,
        messages=messages,
        tools=clean_json(item.tools),
        feedback_text=clean_text(feedback.text) if feedback else "",
        feedback_score=feedback.score if feedback else None,
        reward=feedback.reward if feedback else None,
        metadata=clean_json(item.metadata),
        session_id=clean_text(item.session_id),
        fingerprint=fp,
        occurred_at=_event_time(item.occurred_at, now),
        received_at=now,
    )


_SEVERITY_SQL = (
    "CASE {col} "
    + " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in SEVERITY_RANK.items())
    + " ELSE 0 END"
)

_GROUP_COLUMNS = [
    "project_id", "fingerprint", "fingerprint_version", "title", "agent_name", "kind",
    "error_type", "tool_name", "normalized_message", "severity", "event_count", "first_seen",
    "last_seen", "status", "status_changed_at", "synthesis_status", "synthesis_requested_at",
    "synthesis_error", "synthesis_attempts", "events_at_synthesis", "created_at",
]  # fmt: skip


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


def _upsert_groups(project: Project, incidents: list[Incident], now: datetime) -> dict[str, dict]:
    """Create or update one group per fingerprint in a single statement.

    Concurrent ingests of the same new fingerprint meet at the unique constraint and the loser
    updates the winner's row, so counts are never lost. Returns, per fingerprint, the group id,
    and whether this statement moved it to REGRESSED or to WAITING (we compare the returned
    timestamps with the one we passed: only this statement writes exactly that value)."""
    table = IncidentGroup._meta.db_table
    ops = connection.ops
    stamp = ops.adapt_datetimefield_value(now)
    aggregates: dict[str, dict[str, Any]] = {}
    for incident in incidents:
        agg = aggregates.get(incident.fingerprint)
        if agg is None:
            _, normalized = fingerprint(
                agent=incident.agent_name,
                kind=incident.kind,
                error_type=incident.error_type,
                message=incident.error_message,
                tool=incident.tool_name,
            )
            aggregates[incident.fingerprint] = {
                "incident": incident,
                "normalized": normalized,
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

    rows: list[Any] = []
    # Rows in fingerprint order: concurrent batches then lock groups in the same order and
    # cannot deadlock each other.
    aggregates = dict(sorted(aggregates.items()))
    for fp, agg in aggregates.items():
        inc: Incident = agg["incident"]
        rows.extend(
            [
                project.pk, fp, FINGERPRINT_VERSION,
                _title(inc.error_type, inc.error_message, inc.kind, inc.agent_name),
                inc.agent_name, inc.kind, inc.error_type, inc.tool_name, agg["normalized"],
                agg["severity"], agg["count"], ops.adapt_datetimefield_value(agg["first"]),
                ops.adapt_datetimefield_value(agg["last"]), GroupStatus.UNRESOLVED, None,
                SynthesisStatus.WAITING, stamp, "", 0, 0, stamp,
            ]
        )  # fmt: skip
    placeholders = "(" + ", ".join(["%s"] * len(_GROUP_COLUMNS)) + ")"
    old = table
    sql = f"""
        INSERT INTO {table} ({", ".join(_GROUP_COLUMNS)})
        VALUES {", ".join([placeholders] * len(aggregates))}
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
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, rows)
        returned = cursor.fetchall()
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
    cost more CPU than PostgreSQL spent answering it."""
    if not client_ids:
        return {}
    table = Incident._meta.db_table
    placeholders = ", ".join(["%s"] * len(client_ids))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT client_id, id, group_id, status FROM {table} "
            f"WHERE project_id = %s AND client_id IN ({placeholders})",
            [project_id, *client_ids],
        )
        rows = cursor.fetchall()
    # SQLite hands back UUIDs as hex strings, PostgreSQL as UUID objects.
    return {
        cid: (cid, pk if isinstance(pk, uuid.UUID) else uuid.UUID(pk), group_id, status)
        for cid, pk, group_id, status in rows
    }


_INSERT_CHUNK = 500


def _insert_incidents(incidents: list[Incident]) -> set[uuid.UUID]:
    """INSERT ... ON CONFLICT (project, client id) DO NOTHING, returning the ids it stored.

    One statement instead of bulk_create plus a read-back: the rows a concurrent request
    stored first are simply not returned."""
    fields = Incident._meta.concrete_fields
    table = Incident._meta.db_table
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    stored: set[uuid.UUID] = set()
    for start in range(0, len(incidents), _INSERT_CHUNK):
        chunk = incidents[start : start + _INSERT_CHUNK]
        params = [
            field.get_db_prep_save(field.pre_save(incident, add=True), connection)
            for incident in chunk
            for field in fields
        ]
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES {', '.join([row] * len(chunk))} "
                "ON CONFLICT (project_id, client_id) DO NOTHING RETURNING id",
                params,
            )
            stored.update(
                pk if isinstance(pk, uuid.UUID) else uuid.UUID(pk) for (pk,) in cursor.fetchall()
            )
    return stored


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


def group_synthesis_claim(*, group_id: int) -> bool:
    """Claim a WAITING group for one worker (WAITING → RUNNING). Exactly one caller wins. The
    claim is stamped (``synthesis_claimed_at``): a RUNNING group is stale by when it was
    claimed, not by when it was requested (it may have waited long before its claim)."""
    return (
        IncidentGroup.objects.filter(pk=group_id, synthesis_status=SynthesisStatus.WAITING).update(
            synthesis_status=SynthesisStatus.RUNNING,
            synthesis_attempts=F("synthesis_attempts") + 1,
            synthesis_claimed_at=timezone.now(),
        )
        == 1
    )


def group_synthesis_finish(
    *, group_id: int, status: str, error: str = "", from_status: str = SynthesisStatus.RUNNING
) -> bool:
    """Record the outcome of a synthesis (RUNNING → PROPOSED | NO_SKILL | NEEDS_SKILL | FAILED
    | BUDGET) and mark the group's incidents accordingly."""
    if status not in SynthesisStatus.values or status in (SynthesisStatus.NONE,):
        raise DomainError(f"Unknown synthesis status '{status}'.")
    with transaction.atomic():
        group = IncidentGroup.objects.select_for_update().filter(pk=group_id).first()
        if group is None or group.synthesis_status != from_status:
            return False
        group.synthesis_status = status
        group.synthesis_error = error
        group.events_at_synthesis = group.event_count
        group.save(update_fields=["synthesis_status", "synthesis_error", "events_at_synthesis"])
        incident_status = {
            SynthesisStatus.PROPOSED: IncidentStatus.PROPOSED,
            SynthesisStatus.NO_SKILL: IncidentStatus.NO_SKILL,
            SynthesisStatus.FAILED: IncidentStatus.FAILED,
        }.get(status)
        if incident_status:
            group.incidents.filter(
                status__in=[IncidentStatus.NEW, IncidentStatus.ANALYZING]
            ).update(status=incident_status)
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
