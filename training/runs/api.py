"""Training endpoints (admin keys): list and read runs, train now, pause, resume, cancel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from ninja import Query, Router, Status

from base.auth import admin_auth
from base.errors import DomainError
from base.pagination import paginate
from base.permissions import api_key_label
from base.requests import ApiRequest
from training.policy import services as policy_services
from training.runs import selectors
from training.runs import services as run_services
from training.runs.models import TrainingRun
from training.runs.schemas import (
    IdleStatusOut,
    RunActionIn,
    RunFilter,
    TrainingRunOut,
    TrainingRunPage,
)

# Operation ids as before this module moved into training.runs (see metaclaw_site.api).
OPENAPI_OPERATION_PREFIX = "training_api"

router = Router(tags=["training"])


@router.get("/training/runs", auth=admin_auth, response=TrainingRunPage, summary="List runs")
def list_runs(request: ApiRequest, filters: Query[RunFilter]):
    if not 1 <= filters.limit <= 200:
        raise DomainError("limit must be between 1 and 200.", field="limit")
    qs = selectors.runs_for_project(request.project, status=filters.status)
    items, next_cursor = paginate(
        qs, time_field="created_at", cursor=filters.cursor, limit=filters.limit
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/training/runs/{run_id}", auth=admin_auth, response=TrainingRunOut)
def get_run(request: ApiRequest, run_id: int):
    return selectors.run_for_project(request.project, run_id)


@router.post("/training/runs", auth=admin_auth, response={202: TrainingRunOut}, summary="Train now")
def train_now(request: ApiRequest):
    """Queue a run now, whatever the idle window says (one run at a time: 409 otherwise)."""
    run = run_services.training_run_create(
        project=request.project,
        actor=None,
        actor_label=api_key_label(request.api_key),
    )
    return Status(202, selectors.run_for_project(run.project, run.pk))


def _run_acted(
    request: ApiRequest, run_id: int, act: Callable[..., object], **options: str
) -> TrainingRun:
    """Apply ``act`` (a ``training_run_*`` service) to run ``run_id`` as the request's key;
    answer the run as it is afterwards."""
    run = selectors.run_for_project(request.project, run_id)
    act(run=run, actor=None, actor_label=api_key_label(request.api_key), **options)
    return selectors.run_for_project(run.project, run.pk)


@router.post("/training/runs/{run_id}/pause", auth=admin_auth, response=TrainingRunOut)
def pause_run(request: ApiRequest, run_id: int):
    return _run_acted(request, run_id, run_services.training_run_request_pause)


@router.post("/training/runs/{run_id}/resume", auth=admin_auth, response=TrainingRunOut)
def resume_run(request: ApiRequest, run_id: int):
    return _run_acted(request, run_id, run_services.training_run_resume)


@router.post("/training/runs/{run_id}/cancel", auth=admin_auth, response=TrainingRunOut)
def cancel_run(request: ApiRequest, run_id: int, payload: RunActionIn | None = None):
    reason = payload.reason if payload else ""
    return _run_acted(request, run_id, run_services.training_run_cancel, reason=reason)


@router.get("/training/status", auth=admin_auth, response=IdleStatusOut)
def training_status(request: ApiRequest):
    """Whether the project is idle now, why, when the next window opens, and readiness."""
    project = request.project
    status = policy_services.project_idle_status(project=project)
    readiness = run_services.project_training_readiness(project=project)
    return {
        **asdict(status),
        "ready": readiness.ready,
        "readiness": readiness.reasons,
        "new_samples": readiness.new_samples,
    }
