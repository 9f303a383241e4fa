"""Ingestion: incidents (grouped by fingerprint as they arrive, one transaction a batch, each item
answered on its own) and trajectories. Only these functions, and the group transitions in
``incidents.services``, write incidents, groups and trajectories."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone
from pydantic import TypeAdapter

from base.models import Project
from base.sanitize import clean_json, clean_json_text, clean_text
from incidents import services as incident_services
from incidents import signals
from incidents.fingerprint import decisive_tool, fingerprint, incidental_patterns
from incidents.ingest_sql import (
    NewIncident,
    copy_rows,
    insert_incidents,
    stored_incidents,
    upsert_groups,
)
from incidents.models import (
    GroupStatus,
    Incident,
    IncidentGroup,
    Trajectory,
)
from incidents.schemas import ChatMessage, IncidentIn, TrajectoryIn

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


_MESSAGES = TypeAdapter(list[ChatMessage])


def end_user_of(end_user: str, metadata: dict[str, Any]) -> str:
    """The end user an item names: ``end_user``, else a string ``end_user`` or ``user`` in
    its metadata (where an unknown top-level ``user`` is kept)."""
    if end_user:
        return end_user
    for name in ("end_user", "user"):
        value = metadata.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()[:200]
    return ""


def _build_incident(
    project: Project, item: IncidentIn, now: datetime, api_key_id: int | None = None
) -> NewIncident:
    # Each message with the keys it was sent with, explicit nulls included (ChatMessage).
    messages_json, messages = clean_json_text(
        _MESSAGES.dump_python(item.messages, exclude_unset=True)
    )
    error_type = clean_text(item.error.type.strip())
    error_message = clean_text(item.error.message)
    tool = clean_text(
        item.error.tool
        if item.error.tool is not None
        else decisive_tool(messages, incidental_patterns(project.incidental_tools))
    )
    agent = clean_text(item.agent.name.strip())
    feedback = item.feedback
    # A failure reported without an error message (a user's complaint, an evaluator's verdict)
    # is grouped by what was said about it.
    what_failed = error_message or (clean_text(feedback.text) if feedback else "")
    fp, normalized = fingerprint(
        agent=agent, kind=item.kind, error_type=error_type, message=what_failed, tool=tool
    )
    return NewIncident(
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
        # IncidentIn refuses a top-level reward that differs from feedback.reward.
        reward=item.reward if item.reward is not None else feedback.reward if feedback else None,
        task=clean_text(item.task),
        outcome=clean_text(item.outcome),
        expected_outcome=clean_text(item.expected_outcome),
        metadata=clean_json_text(item.metadata)[0],
        session_id=clean_text(item.session_id),
        end_user=clean_text(end_user_of(item.end_user, item.metadata)),
        api_key_id=api_key_id,
        fingerprint=fp,
        normalized_message=normalized,
        occurred_at=_event_time(item.occurred_at, now),
        received_at=now,
    )


def incidents_ingest(
    *,
    project: Project,
    items: Sequence[IncidentIn],
    actor_label: str = "",
    api_key_id: int | None = None,
) -> list[IngestResult]:
    """Store validated incidents, grouped; idempotent by client id (per project).

    Returns one result per item, in order. A client id seen before (stored earlier, or earlier
    in the same batch) answers with the stored incident and stores nothing. Runs in its own
    transaction; groups that now wait for the fast loop are announced after commit.
    ``api_key_id``: the key that reported them (their provenance)."""
    now = timezone.now()
    results: list[IngestResult | None] = [None] * len(items)
    first_index: dict[str, int] = {}
    candidates: list[tuple[int, Incident]] = []
    for index, item in enumerate(items):
        if item.id in first_index:
            continue
        first_index[item.id] = index
        candidates.append((index, _build_incident(project, item, now, api_key_id)))

    existing = stored_incidents(project.pk, [inc.client_id for _, inc in candidates])
    fresh = [(i, inc) for i, inc in candidates if inc.client_id not in existing]

    awaiting: list[int] = []
    with transaction.atomic():
        groups: dict[str, dict] = {}
        if fresh:
            groups = upsert_groups(project, [inc for _, inc in fresh], now)
            for _, inc in fresh:
                inc.group_id = groups[inc.fingerprint]["id"]
            inserted = insert_incidents(
                sorted((inc for _, inc in fresh), key=lambda inc: inc.client_id)
            )
            lost = [(i, inc) for i, inc in fresh if inc.id not in inserted]
            if lost:
                # Another request stored these client ids between our check and our insert:
                # take back the counts we added and answer with what that request stored.
                _uncount(groups, [inc for _, inc in lost])
                lost_ids = {inc.client_id for _, inc in lost}
                existing.update(stored_incidents(project.pk, sorted(lost_ids)))
                fresh = [(i, inc) for i, inc in fresh if inc.client_id not in lost_ids]
            # One statement for all of them: the batch's group locks are held until commit.
            incident_services.groups_audit_regressed(
                project=project,
                actor_label=actor_label,
                changes=[
                    (
                        IncidentGroup(pk=info["id"], project=project),
                        GroupStatus.RESOLVED,
                        "A new incident arrived in a resolved group.",
                    )
                    for info in groups.values()
                    if info["regressed"]
                ],
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
    *,
    project: Project,
    items: Sequence[TrajectoryIn],
    source: str = "api",
    api_key_id: int | None = None,
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
            end_user=clean_text(end_user_of(item.end_user, item.metadata)),
            api_key_id=api_key_id,
            turn_type=item.turn_type,
            source=source,
            agent_name=clean_text(item.agent.name) if item.agent else "",
            policy_version=item.policy_version,
            model=clean_text(item.model),
            messages=clean_json(_MESSAGES.dump_python(item.messages, exclude_unset=True)),
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
        copy_rows(Trajectory, trajectories)
    else:
        with transaction.atomic():
            Trajectory.objects.bulk_create(trajectories)
    return len(trajectories)
