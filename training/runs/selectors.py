"""Reads the training pages and API share. Every read is scoped to one project."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.db.models import Prefetch, QuerySet

from base.errors import DomainError, NotFound
from base.models import Project
from skills.runtime.upstream import adapter_model_name
from skills.versions.models import PolicyVersion, VersionStatus
from training.datasets.models import DatasetSnapshot
from training.policy.services import idle_policy_get
from training.runs.models import ACTIVE_RUN_STATUSES, RunStatus, TrainingRun

# The samples of a snapshot can be megabytes: pages and the API show its report only.
_LIGHT_DATASET = DatasetSnapshot.objects.defer("samples", "trajectory_ids", "incident_ids")


def runs_for_project(project: Project, *, status: str | None = None) -> QuerySet[TrainingRun]:
    qs = (
        TrainingRun.objects.filter(project=project)
        .select_related("candidate_version", "requested_by")
        .prefetch_related(Prefetch("dataset", queryset=_LIGHT_DATASET))
    )
    if status:
        if status not in RunStatus.values:
            raise DomainError(f"Unknown status '{status}'.", field="status")
        qs = qs.filter(status=status)
    return qs


def run_for_project(project: Project, run_id: int) -> TrainingRun:
    """The run ``run_id`` of ``project``; another project's run is NotFound (no leak)."""
    run = runs_for_project(project).filter(pk=run_id).first()
    if run is None:
        raise NotFound("No such training run.")
    return run


# What the progress partial shows, polled every 2 s: one row without its dataset, log, answers
# or evaluation (the snapshot's samples are megabytes; the metrics a few KB per 100 steps).
_PROGRESS_FIELDS = (
    "id",
    "project_id",
    "status",
    "status_changed_at",
    "pause_requested",
    "pause_reason",
    "step",
    "total_steps",
    "metrics",
    "heartbeat_at",
    "started_at",
    "finished_at",
)
# Time left is read from the pace of the last few steps (the first ones load the model).
_PACE_STEPS = 10


def run_progress_for_project(project: Project, run_id: int) -> TrainingRun:
    """The run ``run_id`` of ``project`` with only the fields its progress shows; another
    project's run is NotFound."""
    run = TrainingRun.objects.filter(project=project, pk=run_id).only(*_PROGRESS_FIELDS).first()
    if run is None:
        raise NotFound("No such training run.")
    return run


@dataclass(frozen=True)
class RunProgress:
    """A run's progress as its page shows it: steps, the last loss, throughput, time left."""

    step: int
    total_steps: int
    percent: int
    loss: float | None
    tokens_per_second: float | None
    seconds_left: float | None
    # [(step, loss), ...] in step order, for the chart.
    losses: list[tuple[int, float]]
    polling: bool
    heartbeat_at: datetime | None


def run_progress(run: TrainingRun) -> RunProgress:
    """Figures from the per-step metrics the backend reported (``loss``, ``tokens_per_second``
    and ``seconds``: older runs lack the last two, and show none)."""
    metrics = [m for m in run.metrics or [] if isinstance(m, dict)]
    losses = [
        (int(m["step"]), float(m["loss"]))
        for m in metrics
        if isinstance(m.get("step"), int) and isinstance(m.get("loss"), (int, float))
    ]
    recent = metrics[-_PACE_STEPS:]
    rates = [m["tokens_per_second"] for m in recent if _number(m.get("tokens_per_second"))]
    paces = [m["seconds"] for m in recent if _number(m.get("seconds"))]
    seconds_left = None
    if run.status == RunStatus.TRAINING and paces and run.total_steps >= run.step:
        seconds_left = sum(paces) / len(paces) * (run.total_steps - run.step)
    return RunProgress(
        step=run.step,
        total_steps=run.total_steps,
        percent=run.progress_percent,
        loss=losses[-1][1] if losses else None,
        tokens_per_second=rates[-1] if rates else None,
        seconds_left=seconds_left,
        losses=losses,
        # A paused run waits for a person or the next idle window: nothing moves until then.
        polling=run.is_active and run.status != RunStatus.PAUSED,
        heartbeat_at=run.heartbeat_at,
    )


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def active_run_for_project(project: Project) -> TrainingRun | None:
    return runs_for_project(project).filter(status__in=ACTIVE_RUN_STATUSES).first()


@dataclass(frozen=True)
class ServePlan:
    """What ``serve_adapter`` loads for a policy version, and the model name it answers as."""

    version: PolicyVersion
    base_model: str
    adapter_dir: str | None
    model_id: str
    # Why the base model is served without an adapter ("" when the adapter is served).
    note: str = ""


def version_to_serve(
    project: Project, number: int | None = None, *, base_only: bool = False
) -> ServePlan:
    """What to serve for the policy version ``number`` (or the active one): its local LoRA
    adapter on its base model, named as the proxy names it (``adapter_model_name``); or, for a
    version with no adapter (skills only) or with ``base_only``, the base model alone, named
    by the base model, for an A/B baseline. Refused (``DomainError``) when the adapter is not
    a local folder: a Tinker adapter is served by Tinker."""
    qs = PolicyVersion.objects.filter(project=project)
    version = (
        qs.filter(number=number).first()
        if number is not None
        else qs.filter(status=VersionStatus.ACTIVE).first()
    )
    if version is None:
        which = f"version {number}" if number is not None else "an active version"
        raise NotFound(f"{project.name} has no {which}.")
    base_model = version.base_model or idle_policy_get(project).base_model
    if base_only or not version.adapter_ref:
        why = (
            f"the base model of v{version.number}, without its adapter, as asked"
            if version.adapter_ref
            else f"v{version.number} has no LoRA adapter (skills only)"
        )
        return ServePlan(
            version=version,
            base_model=base_model,
            adapter_dir=None,
            model_id=base_model,
            note=f"Serving the base model {base_model}: {why}.",
        )
    if "://" in version.adapter_ref or not Path(version.adapter_ref).is_dir():
        raise DomainError(
            f"Version {version.number}'s adapter '{version.adapter_ref}' is not a local folder; "
            "only adapters trained by the local backend can be served here (--base serves its "
            "base model).",
            code="no_local_adapter",
        )
    return ServePlan(
        version=version,
        base_model=base_model,
        adapter_dir=version.adapter_ref,
        model_id=adapter_model_name(version.adapter_ref),
    )
