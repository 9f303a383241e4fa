"""A run's dataset is built outside the run's row lock: while a worker builds it over the whole
history, Pause and Cancel (through the API) answer at once, and the build notices a cancel.

These tests commit (``transaction=True``): the worker is a second thread with its own
connection, as a slow worker is a second process."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from django.db import connection

from base.models import AuditEvent
from incidents.models import Trajectory
from training.datasets.models import DatasetSnapshot
from training.demo import demo_trajectories_load
from training.policy import services as policy_services
from training.runs import execute as runs_execute
from training.runs.models import PauseReason, RunStatus, TrainingRun

pytestmark = pytest.mark.django_db(transaction=True)

# Big enough that building its dataset takes seconds on the test machine.
HISTORY = 6000


@pytest.fixture
def big_history(project):
    policy_services.idle_policy_update(project=project, min_new_samples=1)
    demo_trajectories_load(project, count=HISTORY)
    return project


class Worker(threading.Thread):
    """A slow worker executing one run, as the Celery task does."""

    def __init__(self, run_id: int) -> None:
        super().__init__(daemon=True)
        self.run_id = run_id
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            runs_execute.training_run_execute(run_id=self.run_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            connection.close()


def _start(api, admin_key, queued) -> Worker:
    response = api.post("/api/v1/training/runs", {}, key=admin_key)
    assert response.status_code == 202, response.content
    [run_id] = queued
    worker = Worker(run_id)
    worker.start()
    # Wait for the worker's claim: from here on it builds the dataset.
    deadline = time.monotonic() + 30
    while TrainingRun.objects.get(pk=run_id).status != RunStatus.PREPARING:
        assert time.monotonic() < deadline, "the worker never claimed the run"
        time.sleep(0.01)
    time.sleep(0.05)  # inside the build, which takes seconds
    return worker


def _timed_post(api, path: str, key: str, run_id: int) -> tuple[float, dict]:
    """POST ``path``; how long it took and its answer. It must come back while the dataset is
    still being built (a request that waited for the build's lock finds it attached)."""
    started = time.monotonic()
    response = api.post(path, {}, key=key)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.content
    assert TrainingRun.objects.get(pk=run_id).dataset_id is None, "it waited for the build"
    return elapsed, response.json()


def test_cancel_answers_at_once_while_the_dataset_builds_and_the_build_stops(
    api, big_history, admin_key, no_enqueue, caplog
):
    caplog.set_level(logging.INFO, logger="training.runs.services")
    worker = _start(api, admin_key, no_enqueue)

    elapsed, body = _timed_post(
        api, f"/api/v1/training/runs/{worker.run_id}/cancel", admin_key, worker.run_id
    )
    cancelled_at = time.monotonic()
    worker.join(timeout=60)

    assert elapsed < 2.0, f"Cancel waited {elapsed:.2f} s for the build"
    assert body["status"] == RunStatus.CANCELLED
    assert not worker.is_alive() and worker.error is None
    # The build noticed the cancel and stopped: no snapshot left, none attached.
    assert "dataset build stopped early" in caplog.text
    assert time.monotonic() - cancelled_at < 30
    run = TrainingRun.objects.get(pk=worker.run_id)
    assert run.status == RunStatus.CANCELLED and run.dataset_id is None
    assert not DatasetSnapshot.objects.exists()
    actions = list(
        AuditEvent.objects.filter(object_id=str(run.pk), object_type="training.trainingrun")
        .order_by("created_at", "id")
        .values_list("action", flat=True)
    )
    assert actions == ["training_run.create", "training_run.cancel"]


def test_pause_answers_at_once_while_the_dataset_builds_and_the_run_pauses_with_it(
    api, big_history, admin_key, no_enqueue
):
    worker = _start(api, admin_key, no_enqueue)

    elapsed, body = _timed_post(
        api, f"/api/v1/training/runs/{worker.run_id}/pause", admin_key, worker.run_id
    )
    worker.join(timeout=120)

    assert elapsed < 2.0, f"Pause waited {elapsed:.2f} s for the build"
    assert body["status"] == RunStatus.PREPARING and body["pause_requested"] is True
    assert not worker.is_alive() and worker.error is None
    # The build finished, its snapshot is kept for the resume, and the run paused before
    # training a step.
    run = TrainingRun.objects.get(pk=worker.run_id)
    assert run.status == RunStatus.PAUSED, run.log
    assert run.pause_reason == PauseReason.REQUESTED and not run.pause_requested
    stored = Trajectory.objects.filter(project=run.project).count()
    assert run.dataset is not None and run.dataset.report["considered"] == stored >= HISTORY
    assert run.step == 0 and run.started_at is None
    assert DatasetSnapshot.objects.count() == 1
