"""Training settings through the API (admin keys): the backend, base model, hyperparameters and
budgets, validated and audited by the same service as the dashboard's settings page."""

from __future__ import annotations

import json

import pytest

from base.models import AuditEvent
from tests import factories
from training.policy import services as policy_services
from training.policy.models import IdleWindowPolicy
from training.runs.models import TrainingRun

pytestmark = pytest.mark.django_db

URL = "/api/v1/training/settings"


@pytest.fixture(autouse=True)
def no_enqueue(monkeypatch):
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)


def _send(api, method: str, body: dict, key: str | None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    send = getattr(api.client, method)
    return send(URL, data=json.dumps(body), content_type="application/json", **headers)


def _audits(project) -> list[AuditEvent]:
    return list(
        AuditEvent.objects.filter(project=project, action="training.idle_policy.update").order_by(
            "created_at", "id"
        )
    )


def test_get_shows_the_defaults_without_writing_them(api, project, admin_key):
    response = api.get(URL, key=admin_key)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["backend"] == "local" and body["base_model"] == "smollm2-135m"
    assert body["learning_rate"] == 1e-4 and body["lora_rank"] == 8 and body["total_steps"] == 20
    assert body["min_new_samples"] == 50 and body["max_runs_per_day"] == 1
    assert body["weekly_windows"] == "" and body["updated_at"] is None
    assert not IdleWindowPolicy.objects.filter(project=project).exists()


def test_patch_changes_the_backend_hyperparameters_and_budgets_and_audits_them(
    api, project, admin_key
):
    response = _send(
        api,
        "patch",
        {
            "backend": "tinker",
            "base_model": "Qwen/Qwen3-8B",
            "learning_rate": 5e-5,
            "total_steps": 200,
            "lora_rank": 32,
            "batch_size": 16,
            "max_tokens_per_run": 2_000_000,
            "max_runs_per_day": 3,
            "weekly_windows": "mon-fri 01:00-05:00",
        },
        admin_key,
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["backend"], body["lora_rank"], body["weekly_windows"]) == (
        "tinker",
        32,
        "mon-fri 01:00-05:00",
    )
    policy = IdleWindowPolicy.objects.get(project=project)
    assert policy.base_model == "Qwen/Qwen3-8B" and policy.learning_rate == 5e-5
    assert policy.total_steps == 200 and policy.batch_size == 16
    assert policy.max_tokens_per_run == 2_000_000 and policy.max_runs_per_day == 3
    assert policy.weekly_windows == [{"days": [0, 1, 2, 3, 4], "start": "01:00", "end": "05:00"}]
    (event,) = _audits(project)
    assert event.actor_label.startswith("api-key:")
    assert event.before["lora_rank"] == 8 and event.after["lora_rank"] == 32
    assert set(event.after) == {
        "search_budget_minutes",  # setting the learning rate or the steps pins them
        "backend",
        "base_model",
        "learning_rate",
        "total_steps",
        "lora_rank",
        "batch_size",
        "max_tokens_per_run",
        "max_runs_per_day",
        "weekly_windows",
    }

    started = api.post("/api/v1/training/runs", {}, key=admin_key)
    run = TrainingRun.objects.get(pk=started.json()["id"])
    assert (run.backend, run.base_model) == ("tinker", "Qwen/Qwen3-8B")
    assert run.hyperparameters["learning_rate"] == 5e-5 and run.total_steps == 200


def test_put_takes_gets_answer_back_unchanged_and_keeps_a_masked_secret(api, project, admin_key):
    policy_services.idle_policy_update(
        project=project,
        backend="tinker",
        backend_options={"api_key": "tml-secret-value", "timeout": 30},
    )
    shown = api.get(URL, key=admin_key).json()
    audits_before = len(_audits(project))

    same = _send(api, "put", {k: v for k, v in shown.items() if k != "updated_at"}, admin_key)
    changed = _send(
        api,
        "put",
        {**{k: v for k, v in shown.items() if k != "updated_at"}, "total_steps": 40},
        admin_key,
    )

    assert "tml-secret-value" not in json.dumps(shown)
    assert shown["backend_options"]["timeout"] == 30
    assert same.status_code == 200 and changed.status_code == 200, changed.content
    policy = IdleWindowPolicy.objects.get(project=project)
    assert policy.backend_options == {"api_key": "tml-secret-value", "timeout": 30}
    assert policy.total_steps == 40
    # The unchanged PUT wrote nothing; the second one audited only the step count.
    events = _audits(project)
    assert len(events) == audits_before + 1 and set(events[-1].after) == {"total_steps"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_rank": 1024}, "lora_rank"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"total_steps": 1_000_000}, "total_steps"),
        ({"eval_fraction": 0.95}, "eval_fraction"),
        ({"max_sample_tokens": 4}, "max_sample_tokens"),
        ({"backend": "gpu"}, "backend"),
        ({"objective": "dpo"}, "objective"),
        ({"base_model": "  "}, "base_model"),
        ({"timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"weekly_windows": "someday 25:00-26:00"}, "weekly_windows"),
        ({"ical_url": "ftp://calendar.test/x.ics"}, "ical_url"),
        ({"backend_options": ["not", "an", "object"]}, "backend_options"),
        ({"lora_rank": "many"}, "lora_rank"),
        ({"lora_rank": 2.5}, "lora_rank"),
        ({"lora_rank": None}, "lora_rank"),
        ({"lora_rnk": 4}, "lora_rnk"),
    ],
)
def test_bad_input_is_a_422_naming_the_field_and_changes_nothing(
    api, project, admin_key, body, field
):
    policy_services.idle_policy_update(project=project, lora_rank=8)
    before = IdleWindowPolicy.objects.values().get(project=project)
    audits = len(_audits(project))

    response = _send(api, "patch", {"total_steps": 30, **body}, admin_key)

    assert response.status_code == 422, response.content
    answer = response.json()
    assert answer["code"] in {"invalid", "refused"}
    assert field in [e["field"] for e in answer["errors"]]
    assert IdleWindowPolicy.objects.values().get(project=project) == before
    assert len(_audits(project)) == audits


def test_put_needs_every_setting(api, project, admin_key):
    response = _send(api, "put", {"lora_rank": 4}, admin_key)

    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"backend", "base_model", "learning_rate"} <= fields
    assert not IdleWindowPolicy.objects.filter(project=project).exists()


def test_settings_need_an_admin_key_of_the_project(api, project, other_project, ingest_key):
    other_admin = factories.make_key(other_project, scopes=["admin"])

    assert api.get(URL, key=ingest_key).status_code == 403
    assert _send(api, "patch", {"lora_rank": 4}, ingest_key).status_code == 403
    assert api.get(URL).status_code == 401
    assert _send(api, "patch", {"lora_rank": 4}, other_admin).status_code == 200

    assert not IdleWindowPolicy.objects.filter(project=project).exists()
    assert IdleWindowPolicy.objects.get(project=other_project).lora_rank == 4


def test_the_dashboard_form_and_the_api_refuse_the_same_values(client, api, project, admin_key):
    client.force_login(factories.make_member(project, "admin"))

    page = client.post(
        f"/p/{project.slug}/training/settings/", factories.training_settings_form(lora_rank="300")
    )
    answer = _send(api, "patch", {"lora_rank": 300}, admin_key)

    assert page.status_code == 422 and answer.status_code == 422
    assert "256" in page.content.decode() and "256" in answer.json()["detail"]
    assert not IdleWindowPolicy.objects.filter(project=project).exists()
