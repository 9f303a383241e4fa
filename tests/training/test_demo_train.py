"""The demo's training path, as a person meets it: the training pages and the API say the same
thing about automatic training (and the beat does it), a run that failed before its first step
leaves the day's budget alone, and "Train now" after approving a demo skill trains a real local
LoRA adapter to the end.

The end-to-end test trains the tiny random SmolLM2 by default (the demo's settings otherwise:
12 steps of batch 2, no search; ~20-40 s on 2 cores, most of it loading and evaluating). With
METACLAW_SLOW_TESTS=1 it also trains the shipped SmolLM2-135M exactly as the demo does."""

from __future__ import annotations

import os
import re

import pytest
from django.core.management import call_command

from base.models import Project
from skills.library.models import RevisionStatus, SkillRevision
from tests import factories
from training.demo import DEMO_TRAINING_SETTINGS
from training.policy import services as policy_services
from training.policy.models import IdleWindowPolicy
from training.runs import execute as runs_execute
from training.runs import services as run_services
from training.runs.models import RunStatus, TrainingRun

pytestmark = pytest.mark.django_db


def _auto_training_on_pages(client, project) -> tuple[str, bool, bool]:
    """What the training page says, whether the settings form's box is ticked, and what the
    API answers."""
    home = client.get(f"/p/{project.slug}/training/").content.decode()
    settings_page = client.get(f"/p/{project.slug}/training/settings/").content.decode()
    said = re.search(r'data-auto-training="(on|off)"', home).group(1)
    assert f'data-auto-training="{said}"' in settings_page  # the same sentence on both pages
    box = re.search(r'<input[^>]*name="auto_train"[^>]*>', settings_page).group(0)
    key = factories.make_key(project, scopes=["admin"])
    api = client.get("/api/v1/training/settings", HTTP_AUTHORIZATION=f"Bearer {key}").json()
    return said, "checked" in box, api["auto_train"]


def test_the_pages_the_api_and_the_beat_agree_on_automatic_training(client, project, monkeypatch):
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)
    client.force_login(factories.make_member(project, "admin"))
    assert not IdleWindowPolicy.objects.filter(project=project).exists()

    never_saved = _auto_training_on_pages(client, project)
    started_unsaved = runs_execute.training_schedule_tick(project=project)
    policy_services.idle_policy_update(project=project, auto_train=True, min_new_samples=1)
    saved_on = _auto_training_on_pages(client, project)

    # Unsaved settings: the beat never visits the project, and every page says so.
    assert never_saved == ("off", False, False)
    assert started_unsaved is None
    assert saved_on == ("on", True, True)


def test_a_run_that_failed_before_its_first_step_leaves_the_days_budget(project, monkeypatch):
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)
    policy_services.idle_policy_update(project=project, max_runs_per_day=1)

    early = run_services.training_run_create(project=project)
    run_services.training_run_fail(run_id=early.pk, error="Not enough clean data.")
    after_early = run_services.project_training_readiness(project=project)
    late = run_services.training_run_create(project=project)
    TrainingRun.objects.filter(pk=late.pk).update(step=3)
    run_services.training_run_fail(run_id=late.pk, error="out of memory")
    after_late = run_services.project_training_readiness(project=project)

    assert after_early.runs_last_day == 0
    assert not any("the budget is" in r for r in after_early.reasons)
    assert after_late.runs_last_day == 1
    assert any("the budget is 1" in r and "first step" in r for r in after_late.reasons)


SHIPPED = pytest.param(
    "smollm2-135m",
    marks=[
        pytest.mark.slow,
        pytest.mark.skipif(
            os.environ.get("METACLAW_SLOW_TESTS") != "1", reason="set METACLAW_SLOW_TESTS=1"
        ),
        # 12 real steps and two evaluations on a CPU: minutes when the machine is busy.
        pytest.mark.timeout(1800),
    ],
    id="shipped-smollm2-135m",
)


@pytest.mark.parametrize("base_model", ["tiny-random-smollm2", SHIPPED])
def test_the_demo_trains_to_the_end_after_a_skill_approval_from_train_now(
    client, settings, tmp_path, monkeypatch, django_capture_on_commit_callbacks, base_model
):
    settings.VAR_DIR = tmp_path
    settings.METACLAW_TRAINING_DIR = str(tmp_path / "training")
    call_command("seed_demo", "--quiet")
    project = Project.objects.get(slug="demo")
    policy = IdleWindowPolicy.objects.get(project=project)
    assert (policy.base_model, policy.search_budget_minutes, policy.auto_train) == (
        "smollm2-135m",
        0,
        False,
    )
    if base_model != policy.base_model:
        policy_services.idle_policy_update(project=project, base_model=base_model)
        # A random model's greedy answers are noise: a few tokens show the side-by-side.
        monkeypatch.setattr(runs_execute, "SAMPLE_MAX_TOKENS", 6)
    client.force_login(factories.make_member(project, "admin"))
    proposal = SkillRevision.objects.filter(
        skill__project=project, status=RevisionStatus.PROPOSED
    ).first()

    approved = client.post(f"/p/{project.slug}/review/{proposal.pk}/approve/")
    with django_capture_on_commit_callbacks(execute=True):
        pressed = client.post(f"/p/{project.slug}/training/runs/")
    run = TrainingRun.objects.get(project=project)
    page = client.get(f"/p/{project.slug}/training/runs/{run.pk}/").content.decode()

    assert approved.status_code in (200, 302)
    assert SkillRevision.objects.get(pk=proposal.pk).status == RevisionStatus.APPROVED
    assert pressed.status_code == 302
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.step == run.total_steps == DEMO_TRAINING_SETTINGS["total_steps"]
    assert len(run.metrics) == run.total_steps
    assert all(m["tokens_per_second"] > 0 and m["seconds"] > 0 for m in run.metrics)
    assert run.adapter_ref and (tmp_path / "training").exists()
    assert run.eval_before["loss"] > 0 and run.eval_after["loss"] > 0
    assert "Succeeded" in page and "<polyline" in page
    assert f"data-progress-steps>{run.total_steps}/{run.total_steps}<" in page
    assert 'hx-trigger="every 2s"' not in page
