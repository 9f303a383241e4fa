"""Training runs: whether a project is ready for one, and every state transition of a run.

Run states: queued → preparing → training ⇄ paused → evaluating → succeeded | failed | cancelled.
Each transition is its own function that locks the run (or claims it with a conditional update),
checks the starting state and writes an audit event. Views, the API and Celery tasks only call
these. One module on purpose (a little past 500 lines): the transitions share one locking and
logging helper, and read as the run's state machine top to bottom; the worker's side of a run
is ``execute``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from django.db import IntegrityError, transaction
from django.utils import timezone

from base import permissions
from base.errors import Conflict, NotFound
from base.models import Project, Role
from base.queue import enqueue_on_commit
from base.services import audit_record
from skills.versions.models import PolicyVersion
from training.backends.base import StepReport
from training.datasets.generations import (
    RuleCount,
    incident_rule_filters,
    new_sample_counts,
    policy_generation,
    trajectory_rule_filters,
)
from training.datasets.services import DatasetBuildStopped, dataset_build
from training.policy.models import IdleWindowPolicy
from training.policy.services import idle_policy_get
from training.runs.models import ACTIVE_RUN_STATUSES, PauseReason, RunStatus, TrainingRun, Trigger

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return timezone.now()


# --- Readiness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: list[str]
    new_samples: int
    runs_last_day: int
    # Per generation rule: what it admits and leaves out of the new samples.
    by_rule: tuple[RuleCount, ...] = ()


def _last_cutoff(project: Project) -> datetime | None:
    run = (
        TrainingRun.objects.filter(project=project, status=RunStatus.SUCCEEDED)
        .exclude(dataset=None)
        .select_related("dataset")
        .order_by("-created_at")
        .first()
    )
    return run.dataset.cutoff_at if run else None


def project_training_readiness(
    *, project: Project, now: datetime | None = None, policy: IdleWindowPolicy | None = None
) -> Readiness:
    """Enough new usable samples (trajectories and incidents, counted by the generation rules
    ``dataset_build`` applies, before deduplication) since the last successful run, and within
    the daily budget."""
    from incidents.models import Incident, IncidentStatus, Trajectory

    now = now or _now()
    policy = policy or idle_policy_get(project)
    trajectories = Trajectory.objects.filter(project=project, received_at__lte=now)
    incidents = Incident.objects.filter(project=project, received_at__lte=now).exclude(
        status=IncidentStatus.IGNORED
    )
    cutoff = _last_cutoff(project)
    if cutoff is not None:
        trajectories = trajectories.filter(received_at__gt=cutoff)
        incidents = incidents.filter(received_at__gt=cutoff)
    by_rule = new_sample_counts(
        querysets=[
            (trajectories, trajectory_rule_filters(policy.objective)),
            (incidents, incident_rule_filters(policy.objective)),
        ],
        generation=policy_generation(project),
    )
    new_samples = sum(r.usable for r in by_rule)
    # A run that failed before its first step (no data, no model) trained nothing: it does not
    # use up the day's budget, so fixing the cause and pressing "Train now" again works.
    runs_last_day = (
        TrainingRun.objects.filter(project=project, created_at__gt=now - timedelta(days=1))
        .exclude(status=RunStatus.CANCELLED)
        .exclude(status=RunStatus.FAILED, step=0)
        .count()
    )
    reasons = []
    ready = True
    if new_samples < policy.min_new_samples:
        ready = False
        reasons.append(
            f"{new_samples} new usable samples since the last run; {policy.min_new_samples} needed."
        )
    else:
        reasons.append(f"{new_samples} new usable samples since the last run.")
    reasons += [r.summary for r in by_rule if r.summary]
    if runs_last_day >= policy.max_runs_per_day:
        ready = False
        reasons.append(
            f"{runs_last_day} run(s) in the last 24 hours; the budget is {policy.max_runs_per_day} "
            "(cancelled runs and runs that failed before their first step do not count)."
        )
    if TrainingRun.objects.filter(project=project, status__in=ACTIVE_RUN_STATUSES).exists():
        ready = False
        reasons.append("A run is in progress.")
    return Readiness(ready, reasons, new_samples, runs_last_day, tuple(by_rule))


# --- Run transitions ------------------------------------------------------------------------


def _append_log(run: TrainingRun, line: str, now: datetime | None = None) -> None:
    stamp = (now or _now()).strftime("%Y-%m-%d %H:%M:%S")
    run.log = (run.log + f"{stamp} {line}\n")[-20_000:]


def _locked(run_id: int) -> TrainingRun:
    try:
        return TrainingRun.objects.select_for_update().get(pk=run_id)
    except TrainingRun.DoesNotExist as exc:
        raise NotFound("No such training run.") from exc


def _enqueue_execute(run_id: int) -> None:
    # A broker outage leaves the run QUEUED; the idle check (beat) sends it again.
    enqueue_on_commit("training.tasks.training_run_execute", (run_id,))


@transaction.atomic
def training_run_create(
    *,
    project: Project,
    actor: Any = None,
    actor_label: str = "",
    trigger: str = Trigger.MANUAL,
) -> TrainingRun:
    """Queue a run with the project's current backend and hyperparameters and enqueue it after
    commit. One run in flight per project (a partial unique constraint settles races)."""
    permissions.require_role(actor, project, Role.ADMIN)
    policy = idle_policy_get(project)
    if TrainingRun.objects.filter(project=project, status__in=ACTIVE_RUN_STATUSES).exists():
        raise Conflict("A training run is already in progress for this project.")
    hyper = policy.hyperparameters()
    hyper["search_budget_seconds"] = policy.search_budget_minutes * 60
    try:
        with transaction.atomic():
            run = TrainingRun.objects.create(
                project=project,
                trigger=trigger,
                requested_by=actor if getattr(actor, "is_authenticated", False) else None,
                actor_label=permissions.actor_label(actor, actor_label),
                backend=policy.backend,
                backend_options=policy.backend_options or {},
                base_model=policy.base_model,
                hyperparameters=hyper,
                total_steps=hyper["total_steps"],
                status=RunStatus.QUEUED,
                status_changed_at=timezone.now(),
            )
    except IntegrityError as exc:
        raise Conflict("A training run is already in progress for this project.") from exc
    _append_log(run, f"Queued ({Trigger(trigger).label}) by {run.actor_label}.")
    run.save(update_fields=["log"])
    audit_record(
        action="training_run.create",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=run,
        after={"trigger": trigger, "backend": run.backend, "base_model": run.base_model},
    )
    _enqueue_execute(run.pk)
    return run


def training_run_claim(*, run_id: int, now: datetime | None = None) -> bool:
    """QUEUED → PREPARING, exactly once: the conditional update is the claim."""
    now = now or _now()
    claimed = TrainingRun.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
        status=RunStatus.PREPARING, status_changed_at=now, heartbeat_at=now, pause_reason=""
    )
    return claimed == 1


# How often a dataset build looks whether its run is still preparing (and says it is alive).
BUILD_CHECK_SECONDS = 0.5


def training_run_prepare(*, run_id: int, now: datetime | None = None) -> TrainingRun | None:
    """Freeze the dataset of a PREPARING run (once: a resumed run keeps its snapshot).

    The build reads the project's whole history and may take minutes, so it runs outside the
    run's row lock: a person's Pause or Cancel answers at once. Three steps: under the lock,
    check the state and note this worker's claim (the moment the run became PREPARING);
    build, looking every ``BUILD_CHECK_SECONDS`` whether the run is still so claimed (each
    look is also the run's heartbeat, so a long build is not taken for a dead worker); under
    the lock again, attach the snapshot if the claim still holds, else delete it. None when
    the claim ended meanwhile (the run was cancelled, or marked stale and claimed again): the
    caller stops. Must not run inside a transaction (the lock would be held throughout)."""
    with transaction.atomic():
        run = _locked(run_id)
        if run.status != RunStatus.PREPARING:
            raise Conflict(f"The run is {run.status}, not preparing.")
        if run.dataset_id is not None:
            return run
        project, claimed_at = run.project, run.status_changed_at

    def claimed() -> TrainingRun | None:
        return (
            TrainingRun.objects.select_for_update()
            .filter(pk=run_id, status=RunStatus.PREPARING, status_changed_at=claimed_at)
            .first()
        )

    def still_claimed() -> bool:
        return (
            TrainingRun.objects.filter(
                pk=run_id, status=RunStatus.PREPARING, status_changed_at=claimed_at
            ).update(heartbeat_at=_now())
            == 1
        )

    try:
        dataset = dataset_build(
            project=project,
            now=now,
            should_stop=lambda: not still_claimed(),
            check_every_seconds=BUILD_CHECK_SECONDS,
        )
    except DatasetBuildStopped:
        logger.info("Run %s: dataset build stopped early, the run left preparing.", run_id)
        return None
    with transaction.atomic():
        run = claimed()
        if run is None or run.dataset_id is not None:
            dataset.delete()
            logger.info("Run %s: dataset built but not kept, the run left preparing.", run_id)
            return None
        run.dataset = dataset
        report = dataset.report
        _append_log(
            run,
            f"Dataset {dataset.content_hash[:10]}: {report['train']} train / {report['eval']} eval "
            f"samples of {report['considered']} trajectories.",
        )
        run.save(update_fields=["dataset", "log"])
        audit_record(
            action="training_run.dataset",
            project=run.project,
            obj=run,
            after={"dataset": dataset.pk, "hash": dataset.content_hash, **report["dropped"]},
        )
    return run


@transaction.atomic
def training_run_pause_prepared(*, run_id: int) -> TrainingRun:
    """PREPARING → PAUSED when a person asked for a pause while the dataset was being built:
    the snapshot stays attached for the resume, and no step has been trained. A run that left
    PREPARING meanwhile (cancelled) comes back as it is."""
    run = _locked(run_id)
    if run.status != RunStatus.PREPARING or not run.pause_requested:
        return run
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.PREPARING],
        to=RunStatus.PAUSED,
        action="training_run.paused",
        message="Paused on request before training, with its dataset frozen.",
        updates={"pause_reason": PauseReason.REQUESTED, "pause_requested": False},
    )


def _transition(
    *,
    run_id: int,
    allowed: Iterable[str],
    to: str,
    action: str,
    actor: Any = None,
    actor_label: str = "",
    message: str = "",
    updates: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> TrainingRun:
    """Lock, check the starting state, set the new one with ``updates``, log and audit."""
    now = now or _now()
    run = _locked(run_id)
    allowed = tuple(allowed)
    if run.status not in allowed:
        raise Conflict(
            f"The run is {run.get_status_display().lower()}; this needs it to be "
            + " or ".join(RunStatus(s).label.lower() for s in allowed)
            + "."
        )
    before = run.status
    run.status = to
    run.status_changed_at = now
    fields = ["status", "status_changed_at", "log"]
    for name, value in (updates or {}).items():
        setattr(run, name, value)
        fields.append(name)
    if message:
        _append_log(run, message, now)
    run.save(update_fields=fields)
    audit_record(
        action=action,
        project=run.project,
        actor=actor,
        actor_label=actor_label,
        obj=run,
        before={"status": before},
        after={"status": to},
        message=message,
    )
    return run


@transaction.atomic
def training_run_start_training(*, run_id: int, now: datetime | None = None) -> TrainingRun:
    """PREPARING → TRAINING."""
    now = now or _now()
    run = TrainingRun.objects.only("started_at", "attempts").get(pk=run_id)
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.PREPARING],
        to=RunStatus.TRAINING,
        action="training_run.train",
        message="Training started." if not run.attempts else "Training resumed.",
        updates={
            "heartbeat_at": now,
            "started_at": run.started_at or now,
            "attempts": run.attempts + 1,
        },
        now=now,
    )


@transaction.atomic
def training_run_record_step(*, run_id: int, report: StepReport) -> bool:
    """Progress, the step's metrics and a heartbeat. False when the run left TRAINING
    (cancelled, or marked stale), which tells the worker to stop."""
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None or run.status != RunStatus.TRAINING:
        return False
    entry = {"step": report.step, **{k: finite(v) for k, v in report.metrics.items()}}
    run.metrics = [m for m in run.metrics if m.get("step", 0) < report.step] + [entry]
    run.step = report.step
    run.total_steps = report.total_steps
    run.heartbeat_at = _now()
    run.save(update_fields=["metrics", "step", "total_steps", "heartbeat_at"])
    return True


def finite(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return round(number, 6) if np.isfinite(number) else None


def training_run_record_search(*, run_id: int, search: dict) -> None:
    """The search's tries so far (``training.runs.search``), and a heartbeat."""
    TrainingRun.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES).update(
        search=search, heartbeat_at=_now()
    )


def training_run_heartbeat(*, run_id: int) -> None:
    TrainingRun.objects.filter(pk=run_id, status__in=ACTIVE_RUN_STATUSES).update(
        heartbeat_at=_now()
    )


@transaction.atomic
def training_run_request_pause(
    *, run: TrainingRun, actor: Any = None, actor_label: str = ""
) -> TrainingRun:
    """A person pauses: a queued run pauses at once; a running one saves its state and pauses
    after the current step (the worker reads ``pause_requested``)."""
    permissions.require_role(actor, run.project, Role.ADMIN)
    current = _locked(run.pk)
    if current.status == RunStatus.QUEUED:
        return _transition(
            run_id=run.pk,
            allowed=[RunStatus.QUEUED],
            to=RunStatus.PAUSED,
            action="training_run.pause",
            actor=actor,
            actor_label=actor_label,
            message=f"Paused by {permissions.actor_label(actor, actor_label)} before it started.",
            updates={"pause_reason": PauseReason.REQUESTED, "pause_requested": False},
        )
    if current.status not in (RunStatus.PREPARING, RunStatus.TRAINING):
        raise Conflict(f"A {current.get_status_display().lower()} run cannot be paused.")
    if current.pause_requested:
        raise Conflict("A pause was requested already.")
    current.pause_requested = True
    _append_log(current, f"Pause requested by {permissions.actor_label(actor, actor_label)}.")
    current.save(update_fields=["pause_requested", "log"])
    audit_record(
        action="training_run.pause_request",
        project=current.project,
        actor=actor,
        actor_label=actor_label,
        obj=current,
    )
    return current


@transaction.atomic
def training_run_mark_paused(
    *, run_id: int, state_ref: str | None, step: int, reason: str, now: datetime | None = None
) -> TrainingRun:
    """TRAINING → PAUSED with the resumable checkpoint the backend saved."""
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.TRAINING],
        to=RunStatus.PAUSED,
        action="training_run.paused",
        message=f"Paused after step {step}: {PauseReason(reason).label.lower()}.",
        updates={
            "state_ref": state_ref or "",
            "state_step": step if state_ref else 0,
            "pause_reason": reason,
            "pause_requested": False,
        },
        now=now,
    )


@transaction.atomic
def training_run_resume(
    *, run: TrainingRun, actor: Any = None, actor_label: str = ""
) -> TrainingRun:
    """PAUSED → QUEUED; the worker continues from the last checkpoint."""
    permissions.require_role(actor, run.project, Role.ADMIN)
    resumed = _transition(
        run_id=run.pk,
        allowed=[RunStatus.PAUSED],
        to=RunStatus.QUEUED,
        action="training_run.resume",
        actor=actor,
        actor_label=actor_label,
        message=f"Resume requested by {permissions.actor_label(actor, actor_label)}.",
        updates={"pause_requested": False},
    )
    _enqueue_execute(resumed.pk)
    return resumed


@transaction.atomic
def training_run_cancel(
    *, run: TrainingRun, actor: Any = None, actor_label: str = "", reason: str = ""
) -> TrainingRun:
    """Any run in flight → CANCELLED. A worker still training notices at its next step."""
    permissions.require_role(actor, run.project, Role.ADMIN)
    return _transition(
        run_id=run.pk,
        allowed=ACTIVE_RUN_STATUSES,
        to=RunStatus.CANCELLED,
        action="training_run.cancel",
        actor=actor,
        actor_label=actor_label,
        message=f"Cancelled by {permissions.actor_label(actor, actor_label)}."
        + (f" {reason}" if reason else ""),
        updates={"finished_at": _now(), "pause_requested": False},
    )


@transaction.atomic
def training_run_start_evaluating(
    *, run_id: int, adapter_ref: str, summary: dict, now: datetime | None = None
) -> TrainingRun:
    """TRAINING (finished) or PREPARING (resumed after training) → EVALUATING."""
    now = now or _now()
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.TRAINING, RunStatus.PREPARING],
        to=RunStatus.EVALUATING,
        action="training_run.evaluate",
        message="Training finished; evaluating on the held-out split.",
        updates={"adapter_ref": adapter_ref, "summary": summary, "heartbeat_at": now},
        now=now,
    )


@transaction.atomic
def training_run_succeed(
    *,
    run_id: int,
    eval_after: dict,
    sample_answers: list[dict],
    candidate: PolicyVersion | None,
    improved: bool,
    outcomes: dict | None = None,
) -> TrainingRun:
    """EVALUATING → SUCCEEDED with the outcome verdict (``training.runs.outcomes``). A run that
    did not improve is flagged and offers no candidate."""
    verdict = (outcomes or {}).get("verdict", "")
    if improved:
        message = f"{verdict or 'Improved.'} Candidate {candidate} offered for promotion."
    else:
        message = f"{verdict or 'Did not improve.'} Flagged: no candidate offered."
    return _transition(
        run_id=run_id,
        allowed=[RunStatus.EVALUATING],
        to=RunStatus.SUCCEEDED,
        action="training_run.succeed",
        message=message,
        updates={
            "eval_after": eval_after,
            "sample_answers": sample_answers,
            "candidate_version": candidate,
            "improved": improved,
            "outcomes": outcomes or {},
            "flagged_no_improvement": not improved,
            "finished_at": _now(),
        },
    )


@transaction.atomic
def training_run_fail(*, run_id: int, error: str) -> TrainingRun | None:
    """Any run in flight → FAILED with the reason shown in the UI. None when it already ended."""
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None or run.status not in ACTIVE_RUN_STATUSES:
        return None
    return _transition(
        run_id=run_id,
        allowed=ACTIVE_RUN_STATUSES,
        to=RunStatus.FAILED,
        action="training_run.fail",
        message=f"Failed: {error}",
        updates={"error": error[:5000], "finished_at": _now(), "pause_requested": False},
    )


def training_runs_mark_stale(*, now: datetime | None = None) -> list[int]:
    """Runs whose worker stopped reporting (heartbeat older than the project's limit) become
    PAUSED with reason STALE, resumable from their last checkpoint. Never "training" forever."""
    now = now or _now()
    marked = []
    candidates = TrainingRun.objects.filter(
        status__in=[RunStatus.PREPARING, RunStatus.TRAINING, RunStatus.EVALUATING],
        heartbeat_at__lt=now - timedelta(minutes=1),
    ).select_related("project")
    for run in candidates:
        limit = idle_policy_get(run.project).stale_after_minutes
        if run.heartbeat_at and run.heartbeat_at >= now - timedelta(minutes=limit):
            continue
        with transaction.atomic():
            locked = _locked(run.pk)
            if locked.status not in (
                RunStatus.PREPARING,
                RunStatus.TRAINING,
                RunStatus.EVALUATING,
            ) or (locked.heartbeat_at and locked.heartbeat_at >= now - timedelta(minutes=limit)):
                continue
            _transition(
                run_id=run.pk,
                allowed=[locked.status],
                to=RunStatus.PAUSED,
                action="training_run.stale",
                message=(
                    f"No heartbeat for {limit} minutes while {locked.status}: marked stale; "
                    f"resumable from step {locked.state_step}."
                ),
                updates={"pause_reason": PauseReason.STALE, "pause_requested": False},
                now=now,
            )
        marked.append(run.pk)
    return marked
