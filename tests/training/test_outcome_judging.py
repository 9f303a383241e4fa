"""Issue 23 item 1: a candidate is judged by what its answers do on held-out conversations
(a check the trajectory carries, an expected outcome, a corrected answer), with pass rates,
intervals and sample sizes; loss is secondary. The tiny random model cannot learn a house rule
in a few steps: its loss falls, its outcomes do not, and it is not offered."""

from __future__ import annotations

import json

import pytest

from skills.versions.models import PolicyVersion
from tests import factories
from training.runs import execute as runs_execute
from training.runs.models import RunStatus, TrainingRun
from training.runs.outcomes import OutcomeCase, clean_check, passes, verdict, wilson

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("training_dir")]

RULE = r"\[TCK-\d{4}\]\s*$"
QUESTIONS = [
    "How do I reset my password?",
    "Where are my invoices?",
    "Why does the API answer 429?",
    "How do I enable two-factor login?",
    "How do I add a teammate?",
    "Can I export my data?",
]


def patch_settings(client, key: str, body: dict):
    return client.patch(
        "/api/v1/training/settings",
        data=json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )


def report_house_rule_conversations(api, key, count: int) -> None:
    """Trajectories whose corrected answer follows the house rule, each carrying its check."""
    items = []
    for n in range(count):
        question = QUESTIONS[n % len(QUESTIONS)]
        items.append(
            {
                "session_id": f"s{n}",
                "messages": [
                    {"role": "system", "content": "You are the support agent of Acme."},
                    {"role": "user", "content": f"{question} (order {1000 + n})"},
                    {"role": "assistant", "content": "Please check the documentation."},
                ],
                "outcome": "failure",
                "reward": -1.0,
                "corrected_answer": f"Settings has it. [TCK-{1000 + n}]",
                "metadata": {"check": {"regex": RULE}},
            }
        )
    response = api.post("/api/v1/trajectories/batch", {"items": items}, key=key)
    assert response.json()["accepted"] == count, response.content


def test_checks_targets_and_intervals_judge_answers():
    ticket = OutcomeCase(prompt=[], reference="x", check=clean_check({"regex": RULE}))
    assert passes(ticket, "Done. [TCK-1234]") and not passes(ticket, "Done.")
    corrected = OutcomeCase(prompt=[], reference="Open  Billing > Invoices.")
    assert passes(corrected, "open billing > invoices.") and not passes(corrected, "Billing")
    expected = OutcomeCase(prompt=[], reference="", expected="refund issued")
    assert passes(expected, "OK, the Refund  issued today.")
    assert clean_check({"regex": "("}) is None and clean_check({"shell": "rm"}) is None
    low, high = wilson(0, 40)
    assert low == 0 and 0.08 < high < 0.1
    improved, text = verdict(
        {"passed": 0, "n": 40, "rate": 0.0}, {"passed": 30, "n": 40, "rate": 0.75}
    )
    assert improved and text.startswith("Improved: held-out outcomes 0/40 → 30/40")
    improved, text = verdict(
        {"passed": 2, "n": 4, "rate": 0.5}, {"passed": 3, "n": 4, "rate": 0.75}
    )
    assert not improved and "No improvement the sample supports" in text


def test_a_candidate_that_changes_no_outcome_is_not_offered_though_its_loss_fell(
    api, client, project, admin_key, no_enqueue, django_capture_on_commit_callbacks
):
    pytest.importorskip("peft")
    # Pinned settings: a few steps of the tiny random model, which lower its loss and cannot
    # teach it the rule.
    body = factories.tiny_local_training(total_steps=3, max_sample_tokens=96, eval_fraction=0.3)
    assert patch_settings(client, admin_key, body).status_code == 200
    report_house_rule_conversations(api, admin_key, 12)
    versions_before = PolicyVersion.objects.filter(project=project).count()
    response = api.post("/api/v1/training/runs", {}, key=admin_key)
    run_id = response.json()["id"]

    runs_execute.training_run_execute(run_id=run_id)

    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.search == {}  # pinned: trained once, as set
    assert run.eval_after["loss"] < run.eval_before["loss"]
    before, after = run.outcomes["before"], run.outcomes["after"]
    assert before["n"] == after["n"] == run.dataset.eval_count > 0
    assert before["passed"] == after["passed"] == 0
    assert 0 < after["high"] < 1 and after["low"] == 0
    assert run.improved is False and run.flagged_no_improvement is True
    assert run.candidate_version is None
    assert PolicyVersion.objects.filter(project=project).count() == versions_before
    assert run.outcomes["verdict"].startswith("Changes no outcome: held-out outcomes 0/")
    # The API and the run page say so.
    got = api.get(f"/api/v1/training/runs/{run_id}", key=admin_key).json()
    assert got["verdict"] == run.outcomes["verdict"] and got["improved"] is False
    assert got["outcomes"]["after"]["n"] == after["n"]
    listed = api.get("/api/v1/training/runs", key=admin_key).json()["items"][0]
    assert listed["verdict"].startswith("Changes no outcome")
    client.force_login(factories.make_member(project, "viewer"))
    page = client.get(f"/p/{project.slug}/training/runs/{run_id}/")
    assert page.status_code == 200
    assert b"Changes no outcome" in page.content and b"Candidate (after)" in page.content
