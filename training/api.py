"""Training endpoints (admin keys): list and read runs, train now, pause, resume, cancel."""

from __future__ import annotations

from dataclasses import asdict

from django.http import HttpRequest
from ninja import Query, Router, Status

from base.auth import admin_auth
from base.pagination import paginate
from base.services import DomainError

from . import selectors, services
from .schemas import IdleStatusOut, RunActionIn, RunFilter, TrainingRunOut, TrainingRunPage

router = Router(tags=["training"])


def _actor_label(request: HttpRequest) -> str:
    return f"api-key:{request.api_key.prefix}"  # type: ignore[attr-defined]


@router.get("/training/runs", auth=admin_auth, response=TrainingRunPage, summary="List runs")
def list_runs(request: HttpRequest, filters: Query[RunFilter]):
    if not 1 <= filters.limit <= 200:
        raise DomainError("limit must be between 1 and 200.", field="limit")
    qs = selectors.runs_for_project(request.project, status=filters.status)  # type: ignore[attr-defined]
    items, next_cursor = paginate(
        qs, time_field="created_at", cursor=filters.cursor, limit=filters.limit
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/training/runs/{run_id}", auth=admin_auth, response=TrainingRunOut)
def get_run(request: HttpRequest, run_id: int):
    return selectors.run_for_project(request.project, run_id)  # type: ignore[attr-defined]


@router.post("/training/runs", auth=admin_auth, response={202: TrainingRunOut}, summary="Train now")
def train_now(request: HttpRequest):
    """Queue a run now, whatever the idle window says (one run at a time: 409 otherwise)."""
    run = services.training_run_create(
        project=request.project,  # type: ignore[attr-defined]
        actor=None,
        actor_label=_actor_label(request),
    )
    return Status(202, selectors.run_for_project(run.project, run.pk))


@router.post("/training/runs/{run_id}/pause", auth=admin_auth, response=TrainingRunOut)
def pause_run(request: HttpRequest, run_id: int):
    run = selectors.run_for_project(request.project, run_id)  # type: ignore[attr-defined]
    services.training_run_request_pause(run=run, actor=None, actor_label=_actor_label(request))
    return selectors.run_for_project(run.project, run.pk)


@router.post("/training/runs/{run_id}/resume", auth=admin_auth, response=TrainingRunOut)
def resume_run(request: HttpRequest, run_id: int):
    run = selectors.run_for_project(request.project, run_id)  # type: ignore[attr-defined]
    services.training_run_resume(run=run, actor=None, actor_label=_actor_label(request))
    return selectors.run_for_project(run.project, run.pk)


@router.post("/training/runs/{run_id}/cancel", auth=admin_auth, response=TrainingRunOut)
def cancel_run(request: HttpRequest, run_id: int, payload: RunActionIn | None = None):
    run = selectors.run_for_project(request.project, run_id)  # type: ignore[attr-defined]
    services.training_run_cancel(
        run=run,
        actor=None,
        actor_label=_actor_label(request),
        reason=payload.reason if payload else "",
    )
    return selectors.run_for_project(run.project, run.pk)


@router.get("/training/status", auth=admin_auth, response=IdleStatusOut)
def training_status(request: HttpRequest):
    """Whether the project is idle now, why, when the next window opens, and readiness."""
    project = request.project  # type: ignore[attr-defined]
    status = services.project_idle_status(project=project)
    readiness = services.project_training_readiness(project=project)
    return {
        **asdict(status),
        "ready": readiness.ready,
        "readiness": readiness.reasons,
        "new_samples": readiness.new_samples,
    }
