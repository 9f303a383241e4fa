"""In a real browser: a training run's page shows its loss plot and progress, updates them by
itself while the worker reports steps (htmx polling every 2 s), and when the run ends it shows
the result once and stops polling."""

from __future__ import annotations

import pytest
from django.utils import timezone

from training.backends.base import StepReport
from training.runs import services as run_services
from training.runs.models import RunStatus, TrainingRun

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

POLL_WAIT_MS = 15_000


def _report(run: TrainingRun, steps: range, total: int) -> None:
    """The steps as the worker reports them (``training_run_record_step``)."""
    for step in steps:
        metrics = {"loss": 3.0 - 0.2 * step, "tokens_per_second": 240.0, "seconds": 1.0}
        assert run_services.training_run_record_step(
            run_id=run.pk, report=StepReport(step=step, total_steps=total, metrics=metrics)
        )


def test_the_run_page_plots_the_loss_live_and_stops_when_the_run_ends(
    project, person, log_in, page, screenshot, monkeypatch
):
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)
    person("viewer", "vera")
    run = run_services.training_run_create(project=project)
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.TRAINING, started_at=timezone.now()
    )
    _report(run, range(1, 4), total=10)
    log_in("vera")

    page.goto(f"/p/{project.slug}/training/runs/{run.pk}/")
    progress = page.locator("#run-progress")
    assert progress.locator("[data-progress-steps]").inner_text() == "3/10"
    assert progress.locator("svg.loss-chart polyline").count() == 1
    first_points = progress.locator("svg.loss-chart polyline").get_attribute("points")
    screenshot("three-steps")

    _report(run, range(4, 8), total=10)
    page.wait_for_function(
        "document.querySelector('[data-progress-steps]').textContent.trim() === '7/10'",
        timeout=POLL_WAIT_MS,
    )
    points = progress.locator("svg.loss-chart polyline").get_attribute("points")
    assert len(points.split()) == 7 and points != first_points
    assert progress.locator("[data-progress-loss]").inner_text() == "1.6000"
    assert progress.locator("[data-progress-left]").inner_text() == "3 s"
    screenshot("seven-steps")

    _report(run, range(8, 11), total=10)
    run_services.training_run_start_evaluating(run_id=run.pk, adapter_ref="", summary={})
    run_services.training_run_succeed(
        run_id=run.pk, eval_after={"loss": 1.0}, sample_answers=[], candidate=None, improved=False
    )
    # The poll that sees the end reloads the page once; the page drawn then does not poll.
    page.wait_for_selector('#run-progress[data-run-status="succeeded"]', timeout=POLL_WAIT_MS)
    page.wait_for_load_state()
    assert page.locator("#run-progress").get_attribute("hx-trigger") is None
    assert page.locator("[data-progress-steps]").inner_text() == "10/10"
    assert page.locator("#run-progress svg.loss-chart polyline").count() == 1
    assert "Did not improve. Flagged" in page.content()  # the log: the whole page was redrawn
    screenshot("finished")
    assert not page.js_errors
