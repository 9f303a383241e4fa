"""The replay gate's writes: a gate requested for a candidate, claimed and run by a slow worker
(``skills.tasks.replay_gate_run``), its pairs and its verdict.

A gate passes when the candidate wins at least as many pairs as it loses (or when no recorded
failing conversation is there to replay). It stops at the project's caps (model calls and
tokens), judging what it replayed so far."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from base import permissions
from base.errors import Conflict, NotFound
from base.models import Project, Role
from base.queue import enqueue_on_commit
from base.services import audit_record
from incidents.selectors import incident_text
from skills.gate import judge, replay, selectors
from skills.gate.models import GateMode, GateStatus, ReplayGate, ReplayPair
from skills.runtime.policy import policy_snapshot
from skills.versions.models import PolicyVersion, VersionStatus

logger = logging.getLogger(__name__)

RUN_TASK = "skills.tasks.replay_gate_run"
# What one pair may cost at most: two replays and a judgement.
CALLS_PER_PAIR = 3


@transaction.atomic
def replay_gate_request(*, version: PolicyVersion, actor: Any, actor_label: str = "") -> ReplayGate:
    """A new gate for the CANDIDATE ``version`` against the active version, run on the slow
    queue after commit. Idempotent: a gate already waiting or running for it is returned."""
    project = Project.objects.select_for_update().get(pk=version.project_id)
    permissions.require_role(actor, project, Role.ADMIN)
    version = PolicyVersion.objects.get(pk=version.pk)
    if version.status != VersionStatus.CANDIDATE:
        raise Conflict(f"v{version.number} is {version.status}: only a candidate is gated.")
    waiting = ReplayGate.objects.filter(
        version=version, status__in=[GateStatus.PENDING, GateStatus.RUNNING]
    ).first()
    if waiting is not None:
        return waiting
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    label = permissions.actor_label(actor, actor_label)
    gate = ReplayGate.objects.create(
        project=project,
        version=version,
        baseline_number=active.number,
        max_calls=project.replay_gate_max_calls,
        max_tokens=project.replay_gate_max_tokens,
        requested_by_label=label,
    )
    audit_record(
        action="replay_gate.request",
        project=project,
        actor=actor,
        actor_label=label,
        obj=version,
        after={"gate": gate.pk, "baseline": active.number, "max_calls": gate.max_calls,
               "max_tokens": gate.max_tokens},
    )  # fmt: skip
    enqueue_on_commit(RUN_TASK, (gate.pk,))
    return gate


def replay_gate_run(*, gate_id: int) -> ReplayGate | None:
    """Claim a PENDING gate (PENDING → RUNNING, one worker only) and run it; None when another
    worker has it or it is done (a redelivered message). Long: outside any transaction, each
    pair saved as it is judged."""
    claimed = ReplayGate.objects.filter(pk=gate_id, status=GateStatus.PENDING).update(
        status=GateStatus.RUNNING, started_at=timezone.now()
    )
    if claimed != 1:
        return None
    gate = ReplayGate.objects.select_related("project", "version").get(pk=gate_id)
    try:
        _run(gate)
    except replay.ReplayError as exc:
        _finish(gate, GateStatus.ERROR, note=str(exc))
    except Exception as exc:  # noqa: BLE001 - the page must say why, never show "running"
        logger.exception("Replay gate %s failed.", gate_id)
        _finish(gate, GateStatus.ERROR, note=f"The gate failed: {exc!r}"[:500])
    return gate


def _run(gate: ReplayGate) -> None:
    project, version = gate.project, gate.version
    baseline = PolicyVersion.objects.filter(project=project, number=gate.baseline_number).first()
    if baseline is None:
        raise NotFound("The version the gate compares with is gone.")
    candidate_snap = policy_snapshot(project_id=project.pk, version=version.number)
    active_snap = policy_snapshot(project_id=project.pk, version=baseline.number)
    sample = selectors.replay_sample(project, version, baseline)
    replayed = 0
    for index, incident in enumerate(sample):
        conversation = replay.conversation_until_failure(incident)
        if not conversation:
            continue
        if gate.calls + CALLS_PER_PAIR > gate.max_calls or gate.tokens >= gate.max_tokens:
            gate.capped = True
            break
        candidate = replay.replay(
            project=project,
            snapshot=candidate_snap,
            incident=incident,
            messages=replay.messages_for(candidate_snap, conversation),
        )
        active = replay.replay(
            project=project,
            snapshot=active_snap,
            incident=incident,
            messages=replay.messages_for(active_snap, conversation),
        )
        gate.calls += 2
        gate.tokens += candidate.tokens + active.tokens
        expected = incident_text(incident, "expected_outcome")
        verdict = judge.expected_check(
            expected=expected, candidate=candidate.text, active=active.text
        )
        if verdict is None and gate.tokens < gate.max_tokens:
            verdict = judge.judge_pair(
                conversation=conversation,
                error=incident.error_message,
                expected=expected,
                candidate=candidate.text,
                active=active.text,
                candidate_first=index % 2 == 0,
            )
        if verdict is None:
            gate.capped = True
            verdict = judge.Judgement("tie", "none", "The token cap left nothing to judge with.")
        gate.calls += verdict.calls
        gate.tokens += verdict.tokens
        ReplayPair.objects.create(
            gate=gate,
            incident=incident,
            verdict=verdict.verdict,
            method=verdict.method,
            candidate_answer=candidate.text[:20_000],
            active_answer=active.text[:20_000],
            reason=verdict.reason,
        )
        setattr(gate, _COUNTER[verdict.verdict], getattr(gate, _COUNTER[verdict.verdict]) + 1)
        gate.save(update_fields=["calls", "tokens", "wins", "ties", "losses", "capped"])
        replayed += 1
    if replayed == 0 and gate.capped:
        _finish(gate, GateStatus.ERROR, note="The caps allow no replay: raise them.")
        return
    note = "" if replayed else "No recorded failing conversation to replay."
    if gate.capped:
        note = f"Stopped at the caps after {replayed} of {len(sample)} conversations."
    passed = gate.wins >= gate.losses
    _finish(gate, GateStatus.PASSED if passed else GateStatus.FAILED, note=note)


_COUNTER = {"win": "wins", "tie": "ties", "loss": "losses"}


def _finish(gate: ReplayGate, status: str, *, note: str) -> None:
    gate.status = status
    gate.note = note
    gate.finished_at = timezone.now()
    gate.save(update_fields=["status", "note", "finished_at", "calls", "tokens", "capped"])
    audit_record(
        action=f"replay_gate.{status}",
        project=gate.project,
        actor_label="replay gate",
        obj=gate.version,
        after={"wins": gate.wins, "ties": gate.ties, "losses": gate.losses, "calls": gate.calls,
               "tokens": gate.tokens, "capped": gate.capped, "baseline": gate.baseline_number},
        message=note,
    )  # fmt: skip


def promotion_check(*, project: Project, version: PolicyVersion) -> None:
    """Refuse (Conflict, code ``replay_gate``) to promote a candidate of a project that
    requires the gate, unless its latest gate passed against the version active now."""
    if project.replay_gate_mode != GateMode.REQUIRED:
        return
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    if selectors.gate_passed(version, active.number):
        return
    gate = selectors.latest_gate(version)
    state = "has no replay gate" if gate is None else f"has a {gate.status} replay gate"
    if gate is not None and gate.baseline_number != active.number:
        state = f"was gated against v{gate.baseline_number}, not the active v{active.number}"
    raise Conflict(
        f"This project requires a passed replay gate before promotion (replay_gate): "
        f"v{version.number} {state}. Run the gate and promote once it passes.",
        code="replay_gate",
    )
