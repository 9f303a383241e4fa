"""Issue 23 item 2: with nothing set by hand a run chooses its own learning rate and steps
within its time budget, scored by held-out outcomes, and records every try and why it kept
one; a person who sets the learning rate or the steps pins them."""

from __future__ import annotations

import os

import pytest

from tests.training.test_outcome_judging import patch_settings, report_house_rule_conversations
from training.policy.models import IdleWindowPolicy
from training.runs import execute as runs_execute
from training.runs import search
from training.runs.models import RunStatus, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _short(settings, tmp_path, monkeypatch):
    settings.METACLAW_TRAINING_DIR = str(tmp_path / "training")
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)
    # The same plan, in fewer steps: two a rung, four at most.
    monkeypatch.setattr(search, "RUNG_STEPS", 2)
    monkeypatch.setattr(search, "MAX_STEPS", 4)


BASE = {
    "backend": "local",
    "base_model": "tiny-random-smollm2",
    "backend_options": {"num_threads": min(2, os.cpu_count() or 1)},
    "max_sample_tokens": 96,
    "eval_fraction": 0.3,
    "min_new_samples": 1,
}


def test_a_run_with_default_settings_searches_and_records_what_it_tried(
    api, client, project, admin_key
):
    pytest.importorskip("peft")
    assert patch_settings(client, admin_key, BASE).status_code == 200
    assert IdleWindowPolicy.objects.get(project=project).search_budget_minutes == 30
    report_house_rule_conversations(api, admin_key, 12)
    run_id = api.post("/api/v1/training/runs", {}, key=admin_key).json()["id"]

    runs_execute.training_run_execute(run_id=run_id)

    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == RunStatus.SUCCEEDED, run.error
    trials = run.search["trials"]
    # Every learning rate of the grid for a rung, then the best trained on from its checkpoint.
    assert [t["lr"] for t in trials[:3]] == list(search.LR_GRID)
    assert [t["steps"] for t in trials[:3]] == [2, 2, 2]
    assert len(trials) == 4 and trials[3]["steps"] == 4 and trials[3]["continued_from"] in (0, 1, 2)
    assert trials[3]["lr"] == trials[trials[3]["continued_from"]]["lr"]
    assert all(t["n"] == run.dataset.eval_count and t["loss"] is not None for t in trials)
    kept = trials[run.search["kept"]]
    assert run.search["reason"].startswith(f"Kept lr {kept['lr']:g} × {kept['steps']} steps")
    assert run.adapter_ref == kept["adapter_ref"]
    assert run.step == sum(t["trained_steps"] for t in trials) == 8
    # The tiny model learns no rule: still not offered, and the page shows the search.
    assert run.improved is False and run.candidate_version is None
    assert run.outcomes["search"] == run.search["reason"]
    got = api.get(f"/api/v1/training/runs/{run_id}", key=admin_key).json()
    assert len(got["search"]["trials"]) == 4
    from tests import factories

    client.force_login(factories.make_member(project, "viewer"))
    page = client.get(f"/p/{project.slug}/training/runs/{run_id}/")
    assert b"Learning rate and steps, chosen by the run" in page.content


def test_setting_the_learning_rate_by_hand_pins_it_and_skips_the_search(
    api, client, project, admin_key
):
    pytest.importorskip("peft")
    assert patch_settings(client, admin_key, {**BASE, "learning_rate": 5e-3}).status_code == 200
    assert IdleWindowPolicy.objects.get(project=project).search_budget_minutes == 0
    # The same body again changes nothing and pins nothing more; a budget unpins.
    assert patch_settings(client, admin_key, {"search_budget_minutes": 5}).status_code == 200
    assert IdleWindowPolicy.objects.get(project=project).search_budget_minutes == 5
    assert patch_settings(client, admin_key, {"total_steps": 2}).status_code == 200
    policy = IdleWindowPolicy.objects.get(project=project)
    assert policy.search_budget_minutes == 0 and policy.learning_rate == 5e-3
    report_house_rule_conversations(api, admin_key, 12)
    run_id = api.post("/api/v1/training/runs", {}, key=admin_key).json()["id"]

    runs_execute.training_run_execute(run_id=run_id)

    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.search == {} and run.step == 2
    assert run.hyperparameters["learning_rate"] == 5e-3
    assert run.outcomes["judged_by"] == "outcomes"
