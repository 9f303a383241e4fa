"""Canary releases' writes: start, stop, promote (a person's decision, through
``policy_version_promote``), and the periodic check that rolls a canary back automatically,
audited and notified with its figures.

Lock order as in ``skills.versions.services``: the project row first, then the canary."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from base import permissions
from base.errors import Conflict, DomainError, NotFound
from base.models import Project, Role
from base.services import audit_record
from skills.canary import selectors
from skills.canary.models import CanaryOutcome, CanaryRelease
from skills.canary.notify import automatic_decision_notify
from skills.canary.signals import canary_changed
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.services import policy_version_promote


def _announce(project_id: int) -> None:
    transaction.on_commit(
        lambda: canary_changed.send(sender=CanaryRelease, project_id=project_id), robust=True
    )


def _lock(project_id: int) -> Project:
    return Project.objects.select_for_update().get(pk=project_id)


def _locked_canary(canary: CanaryRelease) -> CanaryRelease:
    locked = (
        CanaryRelease.objects.select_for_update(of=("self",))
        .select_related("version", "project")
        .filter(pk=canary.pk)
        .first()
    )
    if locked is None:
        raise NotFound("No such canary release.")
    return locked


@transaction.atomic
def canary_start(
    *,
    version: PolicyVersion,
    actor: Any,
    share_percent: int,
    margin_per_1000: float,
    min_turns: int,
    actor_label: str = "",
) -> CanaryRelease:
    """Serve the CANDIDATE ``version`` to ``share_percent`` % of the sessions. Refused while
    another canary runs (Conflict) and for figures out of range (DomainError on the field)."""
    project = _lock(version.project_id)
    permissions.require_role(actor, project, Role.ADMIN)
    version = PolicyVersion.objects.get(pk=version.pk)
    if version.status != VersionStatus.CANDIDATE:
        raise Conflict(f"v{version.number} is {version.status}: only a candidate goes to a canary.")
    if not 1 <= share_percent <= 50:
        raise DomainError("The canary's share is 1 to 50 % of the sessions.", field="share_percent")
    if not 0 <= margin_per_1000 <= 1000:
        raise DomainError("The margin is 0 to 1,000 incidents per 1,000 turns.", field="margin")
    if not 1 <= min_turns <= 10_000_000:
        raise DomainError("The evidence is at least one turn per arm.", field="min_turns")
    running = selectors.running_canary(project)
    if running is not None:
        raise Conflict(
            f"A canary of v{running.version.number} is running: stop or promote it first."
        )
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    label = permissions.actor_label(actor, actor_label)
    try:
        with transaction.atomic():
            canary = CanaryRelease.objects.create(
                project=project,
                version=version,
                control_number=active.number,
                share_percent=share_percent,
                margin_per_1000=margin_per_1000,
                min_turns=min_turns,
                started_by_label=label,
            )
    except IntegrityError as exc:  # the partial unique index; the project lock makes it rare
        raise Conflict("Another canary started meanwhile.") from exc
    audit_record(
        action="canary.start",
        project=project,
        actor=actor,
        actor_label=label,
        obj=version,
        after={"share_percent": share_percent, "margin_per_1000": margin_per_1000,
               "min_turns": min_turns, "control": active.number},
    )  # fmt: skip
    _announce(project.pk)
    return canary


def _end(
    canary: CanaryRelease, outcome: str, *, actor: Any, label: str, reason: str, figures: dict
) -> None:
    now = timezone.now()
    canary.outcome = outcome
    canary.ended_at = now
    canary.checked_at = now
    canary.ended_by_label = label
    canary.end_reason = reason
    canary.figures = figures
    canary.save(
        update_fields=["outcome", "ended_at", "checked_at", "ended_by_label", "end_reason",
                       "figures"]
    )  # fmt: skip
    audit_record(
        action=f"canary.{outcome}",
        project=canary.project,
        actor=actor,
        actor_label=label,
        obj=canary.version,
        before={"outcome": CanaryOutcome.RUNNING},
        after={"outcome": outcome, "figures": figures},
        message=reason,
    )
    _announce(canary.project_id)


def _running(canary: CanaryRelease, actor: Any) -> CanaryRelease:
    _lock(canary.project_id)
    canary = _locked_canary(canary)
    permissions.require_role(actor, canary.project, Role.ADMIN)
    if canary.outcome != CanaryOutcome.RUNNING:
        raise Conflict(
            f"The canary of v{canary.version.number} already ended "
            f"({canary.get_outcome_display().lower()}, by {canary.ended_by_label or 'someone'})."
        )
    return canary


@transaction.atomic
def canary_stop(
    *, canary: CanaryRelease, actor: Any, reason: str = "", actor_label: str = ""
) -> CanaryRelease:
    """End a running canary: every session gets the active version again; the version stays a
    candidate."""
    canary = _running(canary, actor)
    label = permissions.actor_label(actor, actor_label)
    figures = selectors.canary_figures(canary).as_dict()
    _end(canary, CanaryOutcome.STOPPED, actor=actor, label=label, reason=reason, figures=figures)
    return canary


@transaction.atomic
def canary_promote(
    *,
    canary: CanaryRelease,
    actor: Any,
    reason: str = "",
    actor_label: str = "",
    replaces: int | None = None,
) -> CanaryRelease:
    """A person's decision: promote the canary's version to everyone
    (``policy_version_promote``, with its refusals: another active version, a required replay
    gate) and end the canary."""
    canary = _running(canary, actor)
    label = permissions.actor_label(actor, actor_label)
    figures = selectors.canary_figures(canary).as_dict()
    policy_version_promote(
        version=canary.version, actor=actor, reason=reason, actor_label=label, replaces=replaces
    )
    _end(canary, CanaryOutcome.PROMOTED, actor=actor, label=label, reason=reason, figures=figures)
    return canary


@transaction.atomic
def canary_check(*, canary_id: int) -> CanaryRelease | None:
    """Compare the arms of a running canary; roll it back automatically when the canary's rate
    exceeds control's by the margin with enough evidence (audit event and notifications with
    the figures). A canary whose version was promoted or rejected elsewhere ends here too.
    Idempotent: an ended canary is left alone (None)."""
    canary = CanaryRelease.objects.filter(pk=canary_id, outcome=CanaryOutcome.RUNNING).first()
    if canary is None:
        return None
    _lock(canary.project_id)
    canary = _locked_canary(canary)
    if canary.outcome != CanaryOutcome.RUNNING:
        return None
    figures = selectors.canary_figures(canary)
    data = figures.as_dict()
    version = canary.version
    if version.status != VersionStatus.CANDIDATE:
        outcome = (
            CanaryOutcome.PROMOTED
            if version.status in (VersionStatus.ACTIVE, VersionStatus.RETIRED)
            else CanaryOutcome.STOPPED
        )
        why = f"v{version.number} was {version.status} outside the canary."
        _end(canary, outcome, actor=None, label="canary check", reason=why, figures=data)
        return canary
    if not figures.rollback:
        canary.figures = data
        canary.checked_at = timezone.now()
        canary.save(update_fields=["figures", "checked_at"])
        return canary
    reason = rollback_reason(canary, figures)
    _end(
        canary, CanaryOutcome.ROLLED_BACK, actor=None, label="canary check", reason=reason,
        figures=data,
    )  # fmt: skip
    automatic_decision_notify(
        project=canary.project,
        event="canary.rolled_back",
        title=f"Canary of v{version.number} rolled back automatically",
        text=reason,
        figures=data,
    )
    return canary


def rollback_reason(canary: CanaryRelease, figures: selectors.Figures) -> str:
    return (
        f"v{canary.version.number} (canary, {canary.share_percent} % of sessions): "
        f"{figures.canary.incidents} incidents in {figures.canary.turns} turns = "
        f"{figures.canary.rate:.1f} per 1,000; control: {figures.control.incidents} in "
        f"{figures.control.turns} = {figures.control.rate:.1f} per 1,000. Worse by more than "
        f"the margin of {canary.margin_per_1000:g} per 1,000 (z = {figures.z:.2f}), with at "
        f"least {canary.min_turns} turns in each arm. Every session is back on the active "
        "version; the candidate stays for a person to decide."
    )


def canaries_check() -> int:
    """Every running canary, checked (the beat's ``skills.tasks.check_canaries``)."""
    ids = list(
        CanaryRelease.objects.filter(outcome=CanaryOutcome.RUNNING).values_list("pk", flat=True)
    )
    for canary_id in ids:
        canary_check(canary_id=canary_id)
    return len(ids)
