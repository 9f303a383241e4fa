"""Training data survives the fast loop: a person's corrected answer is a target that stays valid
whatever skills are live, so approving a skill between reporting corrected turns and "Train now"
must not throw them away (issue 23). Rewards stay tied to the generation that earned them."""

from __future__ import annotations

import pytest

from incidents.models import Trajectory
from tests import factories
from tests.fakes.tinker_server import FakeTinkerServer
from training.datasets import generations
from training.policy import services as policy_services
from training.runs.models import RunStatus

pytestmark = pytest.mark.django_db

TOPICS = (
    "invoices refunds passwords webhooks exports invitations billing security tokens domains "
    "backups alerts dashboards reports quotas regions storage logging metrics tracing queues "
    "schedules reminders calendars contacts payments subscriptions discounts coupons taxes "
    "shipping returns warranties repairs upgrades downgrades migrations archives sessions "
    "devices printers scanners keyboards monitors cables routers modems antennas batteries "
    "chargers adapters speakers headsets webcams licences seats roles teams projects folders"
).split()


@pytest.fixture
def tinker():
    with FakeTinkerServer() as server:
        yield server


def _corrected_turns(count: int, *, version: int | None = 1) -> list[dict]:
    return [
        {
            "id": f"corrected-{n}",
            "session_id": f"session-{n}",
            "policy_version": version,
            "messages": [
                {"role": "user", "content": f"How do I manage my {topic}?"},
                {"role": "assistant", "content": "I don't know."},
            ],
            "outcome": "failure",
            "reward": -1.0,
            "corrected_answer": f"Open Settings > {topic.title()} and pick “Manage {topic}”.",
        }
        for n, topic in enumerate(TOPICS[:count])
    ]


def _approve_a_skill_through_the_api(api, project, admin_key) -> int:
    revision = factories.make_human_revision(
        project,
        (
            "check-order-id",
            "Check the order id",
            "When a customer asks about an order.",
            "Ask for the order id first.",
        ),
    )
    response = api.post(f"/api/v1/skills/revisions/{revision.pk}/approve", {}, key=admin_key)
    assert response.status_code == 200, response.content
    return project.policy_versions.get(status="active").number


@pytest.mark.timeout(120)
def test_approving_a_skill_between_corrected_turns_and_train_now_keeps_them(
    api, project, admin_key, tinker, django_capture_on_commit_callbacks
):
    factories.tinker_policy(project, tinker, batch_size=4, total_steps=2, min_new_samples=50)
    posted = api.post("/api/v1/trajectories/batch", {"items": _corrected_turns(60)}, key=admin_key)
    assert posted.status_code == 207, posted.content
    assert Trajectory.objects.filter(project=project).count() == 60
    before = api.get("/api/v1/training/status", key=admin_key).json()

    active = _approve_a_skill_through_the_api(api, project, admin_key)
    after = api.get("/api/v1/training/status", key=admin_key).json()
    with django_capture_on_commit_callbacks(execute=True):
        started = api.post("/api/v1/training/runs", {}, key=admin_key)
    run = api.get(f"/api/v1/training/runs/{started.json()['id']}", key=admin_key).json()

    assert active == 2
    assert before["new_samples"] == after["new_samples"] == 60
    assert any(
        "60 of them gathered before the latest skill change" in r for r in after["readiness"]
    )
    assert started.status_code == 202
    assert run["status"] == RunStatus.SUCCEEDED, run["log"] + run["error"]
    dataset = run["dataset"]
    assert dataset["generation_version"] == 2
    assert dataset["train_count"] + dataset["eval_count"] == 60
    assert dataset["train_count"] >= 40
    report = dataset["report"]
    assert "stale_generation" not in report["dropped"]
    assert report["kinds"] == {"corrected": 60}
    target = report["rules"]["target"]
    assert (target["kept"], target["from_older_generations"], target["dropped"]) == (60, 60, {})


def test_rewards_from_before_the_approval_are_left_out_and_the_status_says_why(
    api, project, admin_key
):
    policy_services.idle_policy_update(project=project, objective="rl", min_new_samples=1)
    rewarded = [
        {
            "id": f"rewarded-{n}",
            "policy_version": 1,
            "messages": [
                {"role": "user", "content": f"Where are my {topic}?"},
                {"role": "assistant", "content": f"Your {topic} are under Settings."},
            ],
            "reward": 0.5,
        }
        for n, topic in enumerate(TOPICS[:5])
    ]
    api.post("/api/v1/trajectories/batch", {"items": rewarded}, key=admin_key)
    api.post("/api/v1/trajectories/batch", {"items": _corrected_turns(3)}, key=admin_key)

    _approve_a_skill_through_the_api(api, project, admin_key)
    status = api.get("/api/v1/training/status", key=admin_key).json()

    assert status["new_samples"] == 3
    assert any(
        r.startswith("Rewards: 0 usable; left out: 5 from an older skill generation")
        for r in status["readiness"]
    )


def test_the_rule_of_each_kind_depends_on_the_objective():
    assert generations.rule_for("corrected", "sft") is generations.TARGET
    assert generations.rule_for("corrected", "rl") is generations.TARGET
    assert generations.rule_for("sft", "sft") is generations.TARGET
    assert generations.rule_for("sft", "rl") is generations.REWARD
    assert generations.rule_for("rl", "rl") is generations.REWARD
    assert generations.rule_for("incident", "rl") is generations.REWARD


def test_the_run_page_shows_what_each_rule_kept_and_dropped(client, project, admin_key, api):
    from tests import factories
    from training.runs import services as run_services

    admin = factories.make_member(project, "admin")
    api.post("/api/v1/trajectories/batch", {"items": _corrected_turns(4)}, key=admin_key)
    _approve_a_skill_through_the_api(api, project, admin_key)
    run = run_services.training_run_create(project=project, actor=admin)
    assert run_services.training_run_claim(run_id=run.pk)
    run_services.training_run_prepare(run_id=run.pk)
    client.force_login(admin)

    page = client.get(f"/p/{project.slug}/training/runs/{run.pk}/")
    home = client.get(f"/p/{project.slug}/training/")

    text = page.content.decode()
    assert page.status_code == 200
    assert "Across policy generations" in text and "Targets" in text
    assert "Kept from older skill generations" in text
    assert "4 of them gathered before the latest skill change" in home.content.decode()
