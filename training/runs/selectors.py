"""Reads the training pages and API share. Every read is scoped to one project."""

from __future__ import annotations

from pathlib import Path

from django.db.models import Prefetch, QuerySet

from base.errors import DomainError, NotFound
from base.models import Project
from skills.versions.models import PolicyVersion, VersionStatus
from training.datasets.models import DatasetSnapshot
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


def active_run_for_project(project: Project) -> TrainingRun | None:
    return runs_for_project(project).filter(status__in=ACTIVE_RUN_STATUSES).first()


def dataset_sample_preview(run: TrainingRun, limit: int = 5) -> list[dict]:
    """A few cleaned samples of the run's snapshot (what the model actually sees)."""
    if run.dataset_id is None:
        return []
    samples = (
        DatasetSnapshot.objects.filter(pk=run.dataset_id).values_list("samples", flat=True).first()
    )
    return list(samples or [])[:limit]


def version_to_serve(project: Project, number: int | None = None) -> PolicyVersion:
    """The policy version whose LoRA adapter ``serve_adapter`` runs: ``number``, or the active
    one. Refused (``DomainError``) unless its ``adapter_ref`` is a local adapter folder: a
    Tinker adapter is served by Tinker, and a version without an adapter has nothing to serve."""
    qs = PolicyVersion.objects.filter(project=project)
    version = (
        qs.filter(number=number).first()
        if number is not None
        else qs.filter(status=VersionStatus.ACTIVE).first()
    )
    if version is None:
        which = f"version {number}" if number is not None else "an active version"
        raise NotFound(f"{project.name} has no {which}.")
    if not version.adapter_ref:
        raise DomainError(
            f"Version {version.number} has no LoRA adapter (skills only): nothing to serve.",
            code="no_adapter",
        )
    if "://" in version.adapter_ref or not Path(version.adapter_ref).is_dir():
        raise DomainError(
            f"Version {version.number}'s adapter '{version.adapter_ref}' is not a local folder; "
            "only adapters trained by the local backend can be served here.",
            code="no_local_adapter",
        )
    return version
