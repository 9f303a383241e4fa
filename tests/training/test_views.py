"""Training pages: runs with live progress, the run page, actions and the settings form."""

from __future__ import annotations

import pytest
from django.utils import timezone

from tests import factories
from training.datasets.models import DatasetSnapshot
from training.policy import services as policy_services
from training.policy.models import IdleWindowPolicy
from training.runs import services as run_services
from training.runs.models import RunStatus, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_enqueue(monkeypatch):
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)


def login(client, project, role: str):
    user = factories.make_member(project, role)
    client.force_login(user)
    return user


def _url(project, suffix: str = "") -> str:
    return f"/p/{project.slug}/training/{suffix}"


def _finished_run(project) -> TrainingRun:
    run = run_services.training_run_create(project=project)
    TrainingRun.objects.filter(pk=run.pk).update(
        status=RunStatus.SUCCEEDED,
        step=3,
        total_steps=3,
        metrics=[{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5}],
        eval_before={"loss": 2.4},
        eval_after={"loss": 1.9},
        improved=True,
        sample_answers=[
            {
                "prompt": [{"role": "user", "content": "Where is my invoice?"}],
                "reference": "Billing > Invoices.",
                "before": "I do not know.",
                "after": "Open Billing > Invoices.",
            }
        ],
    )
    return run


def test_the_training_page_shows_idle_status_readiness_and_runs(client, project):
    login(client, project, "viewer")
    policy_services.idle_policy_update(
        project=project, mode="calendar", weekly_windows="mon-fri 01:00-05:00"
    )
    run = _finished_run(project)

    response = client.get(_url(project))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Idle now?" in html and "mon-fri 01:00-05:00" in html
    assert "Next calendar window" in html or "Inside the quiet window" in html
    assert f"#{run.pk}" in html
    assert f'action="{_url(project, "runs/")}"' not in html  # viewers see, admins act


def test_the_runs_table_polls_while_a_run_is_active_and_htmx_gets_the_partial(client, project):
    login(client, project, "viewer")
    run_services.training_run_create(project=project)

    full = client.get(_url(project)).content.decode()
    partial = client.get(_url(project), HTTP_HX_REQUEST="true").content.decode()

    assert 'hx-trigger="every 2s"' in full
    assert partial.lstrip().startswith('<div id="runs"')
    assert "<html" not in partial


def test_the_run_page_shows_the_loss_chart_evaluation_and_answers_side_by_side(client, project):
    login(client, project, "viewer")
    run = _finished_run(project)

    response = client.get(_url(project, f"runs/{run.pk}/"))

    html = response.content.decode()
    assert response.status_code == 200
    assert "<svg" in html and "<polyline" in html
    assert "2.4000" in html and "1.9000" in html
    assert "Open Billing &gt; Invoices." in html
    assert 'hx-trigger="every 2s"' not in html  # finished: no polling


def test_the_run_page_counts_the_incidents_in_its_dataset(client, project):
    login(client, project, "viewer")
    run = _finished_run(project)
    dataset = DatasetSnapshot.objects.create(
        project=project,
        content_hash="0" * 64,
        cutoff_at=timezone.now(),
        incident_ids=["a", "b"],
        report={
            "considered": 5,
            "incidents_considered": 7,
            "incidents": 2,
            "kept": 4,
            "train": 3,
            "eval": 1,
            "dropped": {"incident_not_corrected": 5},
        },
    )
    TrainingRun.objects.filter(pk=run.pk).update(dataset=dataset)

    html = client.get(_url(project, f"runs/{run.pk}/")).content.decode()

    assert "Incidents considered</dt><dd>7<" in html
    assert "2 from incidents" in html
    assert "used only by RL" in html


def test_another_projects_run_is_not_found(client, project, other_project):
    login(client, project, "admin")
    theirs = run_services.training_run_create(project=other_project)

    assert client.get(_url(project, f"runs/{theirs.pk}/")).status_code == 404
    assert client.post(_url(project, f"runs/{theirs.pk}/cancel/")).status_code == 404
    assert TrainingRun.objects.get(pk=theirs.pk).status == RunStatus.QUEUED


def test_an_admin_trains_now_pauses_and_cancels_from_the_page(client, project):
    login(client, project, "admin")

    created = client.post(_url(project, "runs/"))
    run = TrainingRun.objects.get(project=project)
    paused = client.post(_url(project, f"runs/{run.pk}/pause/"), HTTP_HX_REQUEST="true")
    cancelled = client.post(_url(project, f"runs/{run.pk}/cancel/"))

    assert created.status_code == 302 and created["Location"].endswith(f"runs/{run.pk}/")
    assert paused.status_code == 200 and 'id="live"' in paused.content.decode()
    assert cancelled.status_code == 302
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED


def test_a_refused_action_answers_409_with_the_reason(client, project):
    login(client, project, "admin")
    run = _finished_run(project)

    response = client.post(_url(project, f"runs/{run.pk}/cancel/"), HTTP_HX_REQUEST="true")

    assert response.status_code == 409
    assert TrainingRun.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED


def test_a_reviewer_may_not_start_runs(client, project):
    login(client, project, "reviewer")

    assert client.post(_url(project, "runs/")).status_code == 403
    assert not TrainingRun.objects.exists()


def test_the_settings_form_saves_windows_in_the_projects_time_zone(client, project):
    login(client, project, "admin")

    response = client.post(_url(project, "settings/"), factories.training_settings_form())

    assert response.status_code == 302
    policy = IdleWindowPolicy.objects.get(project=project)
    assert policy.weekly_windows == [
        {"days": [0, 1, 2, 3, 4], "start": "01:00", "end": "05:00"},
        {"days": [5, 6], "start": "00:00", "end": "08:00"},
    ]
    assert policy.backend_options == {"num_threads": 2}
    page = client.get(_url(project, "settings/")).content.decode()
    assert "mon-fri 01:00-05:00" in page and "Idle now?" in page


def test_the_settings_form_shows_a_bad_window_next_to_its_field(client, project):
    login(client, project, "admin")

    response = client.post(
        _url(project, "settings/"), factories.training_settings_form(weekly_windows="weekdays 1-5")
    )

    assert response.status_code == 422
    assert "mon-fri 01:00-05:00" in response.content.decode()  # the hint, next to the field
    assert not IdleWindowPolicy.objects.filter(project=project).exists()


def test_viewers_cannot_open_the_settings(client, project):
    login(client, project, "viewer")

    assert client.get(_url(project, "settings/")).status_code == 403
