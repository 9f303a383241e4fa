"""The training API (admin keys): list and read runs, train now, pause, resume, cancel."""

from __future__ import annotations

import pytest

from base.errors import PermissionDenied
from base.models import AuditEvent
from tests import factories
from training.policy import services as policy_services
from training.runs import services as run_services
from training.runs.models import RunStatus, TrainingRun

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("no_enqueue")]


def test_train_now_queues_a_run_and_enqueues_it_after_commit(
    api, project, admin_key, no_enqueue, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/training/runs", {}, key=admin_key)

    assert response.status_code == 202, response.content
    body = response.json()
    run = TrainingRun.objects.get(pk=body["id"])
    assert run.project == project and run.status == RunStatus.QUEUED
    assert run.actor_label.startswith("api-key:")
    assert body["status"] == "queued" and body["dataset"] is None
    assert no_enqueue == [run.pk]
    assert AuditEvent.objects.filter(action="training_run.create", object_id=str(run.pk)).exists()


def test_a_second_train_now_while_one_runs_answers_409(api, project, admin_key):
    api.post("/api/v1/training/runs", {}, key=admin_key)

    response = api.post("/api/v1/training/runs", {}, key=admin_key)

    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert TrainingRun.objects.filter(project=project).count() == 1


def test_pause_resume_and_cancel_through_the_api(api, project, admin_key):
    run_id = api.post("/api/v1/training/runs", {}, key=admin_key).json()["id"]

    paused = api.post(f"/api/v1/training/runs/{run_id}/pause", {}, key=admin_key)
    again = api.post(f"/api/v1/training/runs/{run_id}/pause", {}, key=admin_key)
    resumed = api.post(f"/api/v1/training/runs/{run_id}/resume", {}, key=admin_key)
    cancelled = api.post(
        f"/api/v1/training/runs/{run_id}/cancel", {"reason": "wrong data"}, key=admin_key
    )
    refused = api.post(f"/api/v1/training/runs/{run_id}/resume", {}, key=admin_key)

    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert again.status_code == 409
    assert resumed.json()["status"] == "queued"
    assert cancelled.json()["status"] == "cancelled"
    assert refused.status_code == 409
    assert "wrong data" in TrainingRun.objects.get(pk=run_id).log


def test_list_and_get_runs_are_scoped_to_the_keys_project(api, project, other_project, admin_key):
    mine = run_services.training_run_create(project=project)
    theirs = run_services.training_run_create(project=other_project)

    listed = api.get("/api/v1/training/runs", key=admin_key)
    own = api.get(f"/api/v1/training/runs/{mine.pk}", key=admin_key)
    foreign = api.get(f"/api/v1/training/runs/{theirs.pk}", key=admin_key)
    foreign_cancel = api.post(f"/api/v1/training/runs/{theirs.pk}/cancel", {}, key=admin_key)

    assert [r["id"] for r in listed.json()["items"]] == [mine.pk]
    assert own.status_code == 200 and own.json()["metrics"] == []
    assert foreign.status_code == 404
    assert foreign_cancel.status_code == 404
    assert TrainingRun.objects.get(pk=theirs.pk).status == RunStatus.QUEUED


def test_training_endpoints_need_an_admin_key(api, project, ingest_key):
    assert api.get("/api/v1/training/runs", key=ingest_key).status_code == 403
    assert api.post("/api/v1/training/runs", {}, key=ingest_key).status_code == 403
    assert api.get("/api/v1/training/runs").status_code == 401
    assert not TrainingRun.objects.exists()


def test_a_bad_status_filter_is_a_422_naming_the_field(api, admin_key):
    response = api.get("/api/v1/training/runs", key=admin_key, status="sleeping")

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "status"


def test_status_says_whether_the_project_is_idle_and_ready(api, project, admin_key):
    policy_services.idle_policy_update(project=project, mode="traffic", traffic_threshold_rpm=1000)

    body = api.get("/api/v1/training/status", key=admin_key).json()

    assert body["idle"] is True
    assert body["ready"] is False
    assert any("new usable samples" in r for r in body["readiness"])


def test_a_viewer_cannot_cancel_a_run_and_nothing_changes(project):
    viewer = factories.make_member(project, "viewer")
    run = run_services.training_run_create(project=project)

    with pytest.raises(PermissionDenied):
        run_services.training_run_cancel(run=run, actor=viewer)

    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED
