"""Live progress on the run page: a small region polled every 2 s (steps, loss, tokens/s, time
left, the loss chart) that reads one narrow row, never the dataset, and stops polling when the
run ends. The replay gate's panel does the same with the pairs it replayed."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from skills.gate.models import GateStatus, ReplayGate
from skills.gate.services import replay_gate_request
from skills.versions.models import PolicyVersion
from skills.versions.services import policy_version_create_candidate
from tests import factories
from training.backends.base import StepReport
from training.datasets.models import DatasetSnapshot
from training.runs import services as run_services
from training.runs.models import RunStatus, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_enqueue(monkeypatch):
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)


def _url(project, run, suffix: str = "") -> str:
    return f"/p/{project.slug}/training/runs/{run.pk}/{suffix}"


def _training_run(project, *, steps: int, total: int = 10, seconds: float = 2.0) -> TrainingRun:
    """A run in TRAINING that reported ``steps`` steps through the service the worker calls."""
    run = run_services.training_run_create(project=project)
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.TRAINING, started_at=timezone.now()
    )
    for step in range(1, steps + 1):
        metrics = {"loss": 3.0 - step * 0.25, "tokens_per_second": 150.0 + step, "seconds": seconds}
        assert run_services.training_run_record_step(
            run_id=run.pk, report=StepReport(step=step, total_steps=total, metrics=metrics)
        )
    run.refresh_from_db()
    return run


def test_the_progress_region_shows_steps_loss_throughput_time_left_and_the_loss_plot(
    client, project
):
    client.force_login(factories.make_member(project, "viewer"))
    run = _training_run(project, steps=4, total=10, seconds=2.0)

    response = client.get(_url(project, run, "progress/"), HTTP_HX_REQUEST="true")

    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section class="card" id="run-progress"')
    assert "<html" not in html
    assert "data-progress-steps>4/10<" in html
    assert "data-progress-loss>2.0000<" in html  # 3.0 - 4 * 0.25, the last step's
    assert "data-progress-rate>154<" in html
    assert "data-progress-left>12 s<" in html  # 6 steps left at 2 s a step
    assert "<polyline" in html and 'aria-label="Training loss per step, from 2.750' in html
    assert f'hx-get="{_url(project, run, "progress/")}?seen=training"' in html
    assert 'hx-trigger="every 2s"' in html


def test_the_run_page_polls_only_its_progress_region(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    run = _training_run(project, steps=2)

    html = client.get(_url(project, run)).content.decode()

    assert html.count('hx-trigger="every 2s"') == 1
    assert f'hx-get="{_url(project, run, "progress/")}?seen=training"' in html
    assert "<polyline" in html


def test_a_finished_run_stops_polling_and_a_page_drawn_earlier_reloads_once(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    run = _training_run(project, steps=3, total=3)
    TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)

    polled = client.get(_url(project, run, "progress/?seen=training"), HTTP_HX_REQUEST="true")
    page = client.get(_url(project, run)).content.decode()

    # The poll that notices the end asks htmx to redraw the whole page (evaluation, actions);
    # the region it brings and the page drawn then no longer poll.
    assert polled.status_code == 200 and polled["HX-Refresh"] == "true"
    assert "hx-trigger" not in polled.content.decode()
    assert "data-progress-steps>3/3<" in polled.content.decode()
    assert "hx-trigger" not in page.split('id="run-progress"')[1].split("</section>")[0]
    assert 'hx-trigger="every 2s"' not in page


def test_a_paused_run_does_not_poll_and_a_same_status_poll_does_not_reload(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    run = _training_run(project, steps=2)

    same = client.get(_url(project, run, "progress/?seen=training"), HTTP_HX_REQUEST="true")
    TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.PAUSED)
    paused = client.get(_url(project, run, "progress/"), HTTP_HX_REQUEST="true")

    assert "HX-Refresh" not in same and 'hx-trigger="every 2s"' in same.content.decode()
    assert "hx-trigger" not in paused.content.decode()


def test_the_poll_reads_one_narrow_row_and_stays_small_however_big_the_dataset(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    run = _training_run(project, steps=0, total=600)
    # A snapshot of a few megabytes, and 500 steps of metrics.
    samples = [
        {"split": "train", "kind": "sft", "messages": [{"role": "user", "content": "x" * 2000}]}
        for _ in range(1500)
    ]
    dataset = DatasetSnapshot.objects.create(
        project=project, content_hash="1" * 64, cutoff_at=timezone.now(), samples=samples
    )
    metrics = [
        {"step": s, "loss": 3.0 / s, "tokens_per_second": 120.0, "seconds": 1.5}
        for s in range(1, 501)
    ]
    TrainingRun.objects.filter(pk=run.pk).update(
        dataset=dataset, metrics=metrics, step=500, total_steps=600
    )

    with CaptureQueriesContext(connection) as page_queries:
        page = client.get(_url(project, run))
    page_sql = " ".join(q["sql"] for q in page_queries.captured_queries)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(_url(project, run, "progress/"), HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    # Read before the next request: a request's start empties the connection's query log.
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    runs, datasets = TrainingRun._meta.db_table, DatasetSnapshot._meta.db_table
    assert datasets not in sql
    run_reads = [q["sql"] for q in queries.captured_queries if runs in q["sql"]]
    assert len(run_reads) == 1
    assert f'"{runs}"."log"' not in run_reads[0] and "samples" not in run_reads[0]
    assert len(queries.captured_queries) <= 8, [q["sql"][:80] for q in queries.captured_queries]
    # The chart is thinned to 200 points: the poll stays a few KB, the page it replaces is not.
    assert len(response.content) < 12_000, len(response.content)
    assert response.content.decode().count(" ") < 2_000
    assert "data-progress-steps>500/600<" in response.content.decode()
    assert "data-progress-left>2 min<" in response.content.decode()  # 100 steps at 1.5 s
    assert page.status_code == 200 and len(page.content) > len(response.content)
    # The whole page shows the dataset's report, never its samples.
    assert datasets in page_sql and '"samples"' not in page_sql


def test_another_projects_run_progress_is_not_found(client, project, other_project):
    client.force_login(factories.make_member(project, "admin"))
    theirs = _training_run(other_project, steps=1)

    assert client.get(_url(project, theirs, "progress/")).status_code == 404


# --- the replay gate's panel ----------------------------------------------------------------


def _gate(project, api, ingest_key) -> tuple[PolicyVersion, ReplayGate]:
    """A candidate v2 of ``project`` with a gate requested (on commit, so never sent to a
    worker in this test's transaction), over six recorded failing conversations."""
    for i in range(6):
        payload = factories.incident_payload(
            messages=[
                {"role": "user", "content": f"Where is my order {i}?"},
                {"role": "assistant", "content": "I cannot look it up."},
            ]
        )
        assert api.post("/api/v1/incidents", payload, key=ingest_key).status_code in (200, 201, 202)
    candidate = policy_version_create_candidate(
        project=project, adapter_ref="", base_model="", changelog="t", actor=None
    )
    gate = replay_gate_request(version=candidate, actor=None, actor_label="test")
    return candidate, gate


def test_the_replay_gate_panel_shows_pairs_replayed_and_polls_until_the_gate_ends(
    client, api, project, ingest_key
):
    version, gate = _gate(project, api, ingest_key)
    client.force_login(factories.make_member(project, "viewer"))
    url = f"/p/{project.slug}/versions/{version.number}/replay-gate/"
    ReplayGate.objects.filter(pk=gate.pk).update(status=GateStatus.RUNNING, wins=1, losses=1)

    running = client.get(url, HTTP_HX_REQUEST="true").content.decode()
    ReplayGate.objects.filter(pk=gate.pk).update(
        status=GateStatus.PASSED, wins=4, losses=1, ties=1, finished_at=timezone.now()
    )
    finished = client.get(url, HTTP_HX_REQUEST="true").content.decode()

    assert "data-gate-progress>2 of 6 pairs replayed<" in running
    assert f'hx-get="{url}"' in running and 'hx-trigger="every 2s"' in running
    assert "data-gate-progress>6 of 6 pairs replayed<" in finished
    assert "hx-trigger" not in finished
