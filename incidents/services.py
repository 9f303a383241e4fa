"""Incident groups' state transitions, and the outbox the fast loop reads.

Only these functions and ingestion (``incidents.ingest``) write incidents, groups and
trajectories. The skills app moves a group through the fast loop with the
``group_synthesis_*`` functions below.

Past 500 lines on purpose: every transition of a group (status, the fast loop's outbox, merge
and split) locks group rows in id order and keeps event counts, aliases and synthesis state
consistent with one another; one module keeps those rules side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, Max, Min
from django.utils import timezone

from base import permissions
from base.errors import Conflict, DomainError, NotFound
from base.models import AuditEvent, Project, Role
from base.services import audit_record
from base.sql import columns
from incidents import signals
from incidents.models import (
    AbusiveSource,
    AbusiveSourceKind,
    GroupStatus,
    Incident,
    IncidentGroup,
    IncidentStatus,
    SynthesisStatus,
    Trajectory,
)

CLAIM_CLOCK_LEEWAY = timedelta(seconds=1)


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


def groups_mark_regressed(*, project: Project, reasons: dict[int, str]) -> list[int]:
    """``group_mark_regressed`` for many groups at once, each with its reason, in a constant
    number of statements: the ingest calls it while it holds the batch's group locks. Must run
    in a transaction. Returns the ids that changed (a group regressed already is left alone)."""
    if not reasons:
        return []
    groups = list(
        IncidentGroup.objects.select_for_update()
        .filter(project=project, pk__in=sorted(reasons))
        .exclude(status=GroupStatus.REGRESSED)
        .order_by("pk")
    )
    if not groups:
        return []
    now = timezone.now()
    IncidentGroup.objects.filter(pk__in=[g.pk for g in groups]).update(
        status=GroupStatus.REGRESSED, regressed_at=now, status_changed_at=now
    )
    groups_audit_regressed(project=project, changes=[(g, g.status, reasons[g.pk]) for g in groups])
    return [g.pk for g in groups]


def groups_audit_regressed(
    *,
    project: Project,
    changes: Sequence[tuple[IncidentGroup, str, str]],
    actor_label: str = "system",
) -> None:
    """One audit event per group that became REGRESSED, ``(group, status before, why)``, in
    one statement (``audit_record``'s fields, written in bulk). Call it inside the transaction
    that made the change."""
    AuditEvent.objects.bulk_create(
        [
            AuditEvent(
                project=project,
                actor_label=(actor_label or "system")[:200],
                action="incident_group.regressed",
                object_type=IncidentGroup._meta.label_lower,
                object_id=str(group.pk),
                object_repr=str(group)[:300],
                before={"status": before},
                after={"status": GroupStatus.REGRESSED},
                message=message,
            )
            for group, before, message in changes
        ]
    )


# --- Fast-loop outbox (driven by the skills app) ------------------------------------------


def group_request_synthesis(
    *, group_id: int, from_statuses: Sequence[str], reset_attempts: bool = False
) -> bool:
    """Put a group back in the fast loop's queue (WAITING) if it is in one of
    ``from_statuses``; announce it after commit. ``reset_attempts`` starts a fresh series of
    attempts (a person's retry: the transient-error limit counts claims since the last request).
    Returns whether it changed."""
    now = timezone.now()
    changes: dict[str, Any] = {
        "synthesis_status": SynthesisStatus.WAITING,
        "synthesis_requested_at": now,
        "synthesis_error": "",
    }
    if reset_attempts:
        changes["synthesis_attempts"] = 0
    changed = IncidentGroup.objects.filter(pk=group_id, synthesis_status__in=from_statuses).update(
        **changes
    )
    if changed:
        transaction.on_commit(
            lambda: signals.groups_await_synthesis.send(sender=None, group_ids=[group_id]),
            robust=True,
        )
    return bool(changed)


def groups_request_synthesis(
    *, group_ids: Sequence[int], from_statuses: Sequence[str]
) -> list[int]:
    """``group_request_synthesis`` for many groups in two statements (the ingest's regression
    checks call it while they hold the batch's group locks). Returns the ids that changed."""
    if not group_ids:
        return []
    changed = list(
        IncidentGroup.objects.select_for_update()
        .filter(pk__in=sorted(set(group_ids)), synthesis_status__in=from_statuses)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if changed:
        IncidentGroup.objects.filter(pk__in=changed).update(
            synthesis_status=SynthesisStatus.WAITING,
            synthesis_requested_at=timezone.now(),
            synthesis_error="",
        )
        transaction.on_commit(
            lambda: signals.groups_await_synthesis.send(sender=None, group_ids=changed),
            robust=True,
        )
    return changed


def group_synthesis_claim(*, group_id: int) -> IncidentGroup | None:
    """Claim a WAITING group for one worker (WAITING → RUNNING). Exactly one caller wins and
    gets the group as stored by its claim; the others get None. The claim is stamped
    (``synthesis_claimed_at``): a RUNNING group is stale by when it was claimed, not by when it
    was requested (it may have waited long before its claim).

    One statement, the claim and the read together (``RETURNING``), written out: it starts
    every synthesis, and the ORM's update and select cost more CPU than PostgreSQL's run
    (``benchmarks/synthesis_cost.py`` keeps the ORM's form and compares them).

    A WAITING group whose ``synthesis_requested_at`` lies ahead (a retry's backoff) is not
    claimable before that time."""
    now = timezone.now()
    claimed = list(
        IncidentGroup.objects.raw(
            f"UPDATE {IncidentGroup._meta.db_table} SET synthesis_status = %s, "
            "synthesis_attempts = synthesis_attempts + 1, synthesis_claimed_at = %s "
            f"WHERE id = %s AND synthesis_status = %s "
            "AND (synthesis_requested_at IS NULL OR synthesis_requested_at <= %s) "
            f"RETURNING {columns(IncidentGroup)}",
            [
                SynthesisStatus.RUNNING.value,
                connection.ops.adapt_datetimefield_value(now),
                group_id,
                SynthesisStatus.WAITING.value,
                # A group in a retry's backoff waits until then (an early duplicate message,
                # a sweep, finds nothing to claim); a second's leeway for clocks of two hosts.
                connection.ops.adapt_datetimefield_value(now + CLAIM_CLOCK_LEEWAY),
            ],
        )
    )
    return claimed[0] if claimed else None


def groups_synthesis_heartbeat(*, group_ids: list[int]) -> int:
    """Renew the leases (``synthesis_claimed_at``) of these groups that are still RUNNING: the
    worker synthesising them is alive. Returns how many were renewed."""
    return IncidentGroup.objects.filter(
        pk__in=group_ids, synthesis_status=SynthesisStatus.RUNNING
    ).update(synthesis_claimed_at=timezone.now())


def group_synthesis_finish(
    *,
    group_id: int,
    status: str,
    error: str = "",
    from_status: str = SynthesisStatus.RUNNING,
    requested_at: Any = None,
) -> bool:
    """Record the outcome of a synthesis (RUNNING → PROPOSED | NO_SKILL | NEEDS_SKILL | FAILED
    | BUDGET | WAITING) and mark the group's incidents accordingly. ``requested_at`` (back to
    WAITING only) is when the next attempt is due: the claim and the sweep wait for it."""
    if status not in SynthesisStatus.values or status in (SynthesisStatus.NONE,):
        raise DomainError(f"Unknown synthesis status '{status}'.")
    with transaction.atomic(savepoint=False):  # nested in the fast loop's transaction
        # One conditional UPDATE is the check and the change: it takes the row lock, and a
        # group that left ``from_status`` meanwhile matches nothing. Written out, as the claim
        # (``benchmarks/synthesis_cost.py`` compares it with the ORM's form).
        with connection.cursor() as cursor:
            due = ""
            params: list[Any] = [status, error]
            if requested_at is not None and status == SynthesisStatus.WAITING:
                due = "synthesis_requested_at = %s, "
                params.append(connection.ops.adapt_datetimefield_value(requested_at))
            cursor.execute(
                f"UPDATE {IncidentGroup._meta.db_table} SET synthesis_status = %s, "
                f"synthesis_error = %s, {due}events_at_synthesis = event_count "
                "WHERE id = %s AND synthesis_status = %s",
                [*params, group_id, from_status],
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
    """Groups WAITING for longer than the given age past the time they were due (the sweep
    re-enqueues them): a group in a retry's backoff is due at its ``synthesis_requested_at``,
    so the sweep never shortens a backoff; past it by this age, no queue holds its message."""
    now = timezone.now()
    waiting = IncidentGroup.objects.filter(
        synthesis_status=SynthesisStatus.WAITING,
        synthesis_requested_at__lt=now - timedelta(seconds=older_than_seconds),
    ).values_list("id", flat=True)[:500]
    return list(waiting)


def groups_relate(*, group_id: int, related_ids: Sequence[int]) -> None:
    """Link a group with groups that look like the same failure (both directions; idempotent).
    One autocommitted statement, the pairs in a fixed order: two workers linking the same pair
    from either end would otherwise take the index locks in opposite orders and deadlock
    (bulk_create would also wrap it in a transaction of its own)."""
    if not related_ids:
        return
    table = IncidentGroup.related_groups.through._meta.db_table
    pairs = sorted(
        {(group_id, other) for other in related_ids} | {(o, group_id) for o in related_ids}
    )
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (from_incidentgroup_id, to_incidentgroup_id) VALUES "
            + ", ".join(["(%s, %s)"] * len(pairs))
            + " ON CONFLICT DO NOTHING",
            [pk for pair in pairs for pk in pair],
        )


# --- Merging and splitting groups (people, and the fast loop's similarity merge) -----------

_SEVERITY_ORDER = ["low", "medium", "high", "critical"]


def _locked_groups(project: Project, ids: Sequence[int]) -> dict[int, IncidentGroup]:
    # In id order, as every merge and split takes them: two of them cannot deadlock.
    rows = IncidentGroup.objects.select_for_update().filter(project=project, pk__in=ids)
    return {group.pk: group for group in rows.order_by("pk")}


@transaction.atomic
def groups_merge(
    *,
    project: Project,
    target_id: int,
    source_ids: Sequence[int],
    actor: Any,
    actor_label: str = "",
    reason: str = "",
) -> IncidentGroup:
    """Merge groups into ``target_id``, as Sentry does: their incidents move to the target, the
    incidents that still arrive with their fingerprints go there too (each merged group stays
    as an alias row), counts and first/last seen add up, and the proposals made for them follow
    (``signals.groups_merged``). ``actor`` None is the fast loop's similarity merge, which
    names its reason."""
    sources_wanted = sorted({int(pk) for pk in source_ids} - {int(target_id)})
    if not sources_wanted:
        raise DomainError("Name at least one other group to merge.", field="group_ids")
    groups = _locked_groups(project, [target_id, *sources_wanted])
    missing = [pk for pk in [target_id, *sources_wanted] if pk not in groups]
    if missing:
        raise DomainError(f"Group {missing[0]} does not exist in this project.", field="group_ids")
    target = groups[target_id]
    if target.merged_into_id:
        raise Conflict(
            f"Group {target.pk} was merged into group {target.merged_into_id}: merge into that one."
        )
    sources = [groups[pk] for pk in sources_wanted]
    for source in sources:
        if source.merged_into_id:
            raise Conflict(f"Group {source.pk} was merged into group {source.merged_into_id}.")
    now = timezone.now()
    before = {"event_count": target.event_count}
    moved = Incident.objects.filter(group_id__in=sources_wanted).update(group=target)
    # Groups merged into a source earlier now point at the target: aliases are one hop.
    IncidentGroup.objects.filter(merged_into_id__in=sources_wanted).update(merged_into=target)
    target.event_count += sum(source.event_count for source in sources)
    target.first_seen = min([target.first_seen, *(s.first_seen for s in sources)])
    target.last_seen = max([target.last_seen, *(s.last_seen for s in sources)])
    target.severity = max(
        [target.severity, *(s.severity for s in sources)], key=_SEVERITY_ORDER.index
    )
    fields = ["event_count", "first_seen", "last_seen", "severity"]
    if target.synthesis_status in (
        SynthesisStatus.NONE,
        SynthesisStatus.NO_SKILL,
        SynthesisStatus.FAILED,
    ):
        # More evidence: worth another look by the fast loop.
        target.synthesis_status = SynthesisStatus.WAITING
        target.synthesis_requested_at = now
        target.synthesis_attempts = 0
        fields += ["synthesis_status", "synthesis_requested_at", "synthesis_attempts"]
    target.save(update_fields=fields)
    related = IncidentGroup.related_groups.through
    linked = set(
        related.objects.filter(from_incidentgroup_id__in=sources_wanted).values_list(
            "to_incidentgroup_id", flat=True
        )
    ) - {target.pk, *sources_wanted}
    related.objects.filter(from_incidentgroup_id__in=sources_wanted).delete()
    related.objects.filter(to_incidentgroup_id__in=sources_wanted).delete()
    IncidentGroup.objects.filter(pk__in=sources_wanted).update(
        merged_into=target,
        merged_at=now,
        event_count=0,
        synthesis_status=SynthesisStatus.NONE,
        synthesis_error="",
    )
    signals.groups_merged.send(sender=Project, project=project, target_id=target.pk,
                               source_ids=sources_wanted)  # fmt: skip
    audit_record(
        action="incident_group.merged",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=target,
        before=before,
        after={
            "event_count": target.event_count,
            "merged": [{"id": s.pk, "title": s.title, "events": s.event_count} for s in sources],
            "incidents_moved": moved,
        },
        message=reason,
    )
    if target.synthesis_status == SynthesisStatus.WAITING and "synthesis_status" in fields:
        transaction.on_commit(
            lambda: signals.groups_await_synthesis.send(sender=None, group_ids=[target.pk])
        )
    if linked:
        transaction.on_commit(lambda: groups_relate(group_id=target.pk, related_ids=sorted(linked)))
    return target


@transaction.atomic
def group_split(
    *,
    project: Project,
    group_id: int,
    fingerprints: Sequence[str],
    actor: Any,
    actor_label: str = "",
) -> list[IncidentGroup]:
    """Split incidents off a group by fingerprint, as Sentry's unmerge does: each fingerprint's
    incidents go to their own group (the alias row of a group merged earlier comes back, or a
    new group is made), and so do the incidents that arrive with it later. The group's own
    fingerprint stays. Returns the groups split off."""
    wanted = sorted({str(fp) for fp in fingerprints})
    if not wanted:
        raise DomainError("Name at least one fingerprint to split off.", field="fingerprints")
    group = _locked_groups(project, [group_id]).get(group_id)
    if group is None:
        raise DomainError(f"Group {group_id} does not exist in this project.", field="group_id")
    if group.merged_into_id:
        raise Conflict(f"Group {group.pk} was merged into group {group.merged_into_id}.")
    if group.fingerprint in wanted:
        raise DomainError(
            "A group's own fingerprint stays with it; split off the others.", field="fingerprints"
        )
    present = set(
        group.incidents.filter(fingerprint__in=wanted).values_list("fingerprint", flat=True)
    )
    aliases = {
        alias.fingerprint: alias
        for alias in IncidentGroup.objects.select_for_update().filter(
            project=project, merged_into=group, fingerprint__in=wanted
        )
    }
    unknown = [fp for fp in wanted if fp not in present and fp not in aliases]
    if unknown:
        raise DomainError(
            f"No incident of group {group.pk} has fingerprint {unknown[0]}.", field="fingerprints"
        )
    now = timezone.now()
    split_off: list[IncidentGroup] = []
    for fp in wanted:
        part = aliases.get(fp)
        sample = group.incidents.filter(fingerprint=fp).order_by("occurred_at").first()
        if part is None:
            part = IncidentGroup.objects.create(
                project=project,
                fingerprint=fp,
                fingerprint_version=group.fingerprint_version,
                title=group.title,
                agent_name=group.agent_name,
                kind=sample.kind if sample else group.kind,
                error_type=sample.error_type if sample else group.error_type,
                tool_name=sample.tool_name if sample else group.tool_name,
                normalized_message=group.normalized_message,
                severity=group.severity,
                first_seen=now,
                last_seen=now,
            )
        group.incidents.filter(fingerprint=fp).update(group=part)
        part.merged_into = None
        part.merged_at = None
        part.status = GroupStatus.UNRESOLVED
        part.synthesis_status = SynthesisStatus.WAITING
        part.synthesis_requested_at = now
        part.synthesis_attempts = 0
        _recount(part, now)
        part.save()
        split_off.append(part)
    _recount(group, now)
    group.save(update_fields=["event_count", "first_seen", "last_seen"])
    audit_record(
        action="incident_group.split",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=group,
        after={
            "event_count": group.event_count,
            "split_off": [
                {"id": p.pk, "fingerprint": p.fingerprint, "events": p.event_count}
                for p in split_off
            ],  # fmt: skip
        },
    )
    ids = [part.pk for part in split_off]
    transaction.on_commit(lambda: signals.groups_await_synthesis.send(sender=None, group_ids=ids))
    return split_off


def _recount(group: IncidentGroup, now: Any) -> None:
    stats = Incident.objects.filter(group=group).aggregate(
        n=Count("pk"), first=Min("occurred_at"), last=Max("occurred_at")
    )
    group.event_count = stats["n"]
    group.first_seen = stats["first"] or group.first_seen or now
    group.last_seen = stats["last"] or group.last_seen or now


# --- Abusive sources: a person marks a session or end user whose traffic must not teach ------


@transaction.atomic
def abusive_source_mark(
    *, project: Project, kind: str, value: str, reason: str = "", actor: Any, actor_label: str = ""
) -> AbusiveSource:
    """Mark a session or end user as abusive (admins). Idempotent: marking it again returns the
    mark. Later dataset builds drop its samples; proposals whose evidence came from it are
    flagged on the review page (``selectors.abusive_sources_in_groups``); the audit event
    names the groups it reported into."""
    permissions.require_role(actor, project, Role.ADMIN, message="Marking needs the admin role.")
    if kind not in AbusiveSourceKind.values:
        raise DomainError(f"Unknown kind '{kind}': session or end_user.", field="kind")
    value = (value or "").strip()
    if not value or len(value) > 200:
        raise DomainError("A session id or end user of 1 to 200 characters.", field="value")
    mark, created = AbusiveSource.objects.get_or_create(
        project=project,
        kind=kind,
        value=value,
        defaults={
            "reason": (reason or "").strip()[:2000],
            "marked_by": permissions.actor_user(actor),
            "marked_by_label": actor_label,
        },
    )
    if created:
        column = "session_id" if kind == AbusiveSourceKind.SESSION else "end_user"
        groups = sorted(
            set(
                Incident.objects.filter(project=project, **{column: value}).values_list(
                    "group_id", flat=True
                )
            )
        )
        audit_record(
            action="abusive_source.mark",
            project=project,
            actor=actor,
            actor_label=actor_label,
            obj=mark,
            after={"kind": kind, "value": value, "reason": mark.reason, "groups": groups[:100]},
            message=f"{len(groups)} group(s) hold its incidents: their proposals are flagged.",
        )
    return mark


@transaction.atomic
def abusive_source_unmark(
    *, project: Project, mark_id: int, actor: Any, actor_label: str = ""
) -> None:
    """Take a mark back (admins): later datasets may use the source again."""
    permissions.require_role(actor, project, Role.ADMIN, message="Unmarking needs the admin role.")
    mark = AbusiveSource.objects.select_for_update().filter(project=project, pk=mark_id).first()
    if mark is None:
        raise NotFound("No such abusive source in this project.")
    audit_record(
        action="abusive_source.unmark",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=mark,
        before={"kind": mark.kind, "value": mark.value, "reason": mark.reason},
    )
    mark.delete()
