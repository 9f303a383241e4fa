"""Dataset snapshots: what the slow loop trains on, and what the cleaning keeps out."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.utils import timezone

from incidents.ingest import incidents_ingest, trajectories_ingest
from incidents.models import Incident
from incidents.schemas import IncidentIn, TrajectoryIn
from skills.library import services as library_services
from skills.versions import services as version_services
from tests import factories
from training.datasets import services as datasets_services
from training.datasets.models import DatasetSnapshot
from training.demo import demo_trajectories_load
from training.policy import services as policy_services
from training.runs import services as run_services

pytestmark = pytest.mark.django_db

_ids = itertools.count(1)
SYSTEM = {"role": "system", "content": "You are a helpful support agent."}


WORDS = (
    "invoices refunds passwords webhooks exports invitations billing security tokens domains "
    "backups alerts dashboards reports quotas regions storage logging metrics tracing queues "
    "schedules reminders calendars contacts payments subscriptions discounts coupons taxes "
    "shipping returns warranties repairs upgrades downgrades migrations archives"
).split()


def turn(
    question: str,
    answer: str | None,
    *,
    session: str = "",
    version: int | None = 1,
    reward: float | None = 1.0,
    outcome: str = "success",
    corrected: str = "",
    history: list[dict] | None = None,
) -> TrajectoryIn:
    messages = [SYSTEM, *(history or []), {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    n = next(_ids)
    return TrajectoryIn(
        occurred_at=timezone.now() - timedelta(hours=1) + timedelta(seconds=n),
        id=f"t-{n}",
        session_id=session or f"s-{n}",
        policy_version=version,
        messages=messages,
        reward=reward,
        outcome=outcome,
        corrected_answer=corrected,
    )


def ingest(project, *items: TrajectoryIn) -> None:
    trajectories_ingest(project=project, items=list(items))


def _answers(dataset: DatasetSnapshot) -> list[str]:
    return [s["messages"][-1]["content"] for s in dataset.samples]


def test_cleaning_drops_duplicates_and_unusable_turns_redacts_secrets_and_cuts_long_ones(
    project,
):
    policy_services.idle_policy_update(project=project, max_sample_tokens=120)
    long_history = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"earlier turn {i} " * 20}
        for i in range(6)
    ]
    ingest(
        project,
        turn("How do I reset my password?", "Open Settings, choose Security, then Reset."),
        turn("How do I reset my password?", "Open Settings, choose Security, then Reset."),
        turn("how do I reset my password??", "Open Settings, choose Security, then Reset."),
        turn("Where are my invoices?", "Billing > Invoices lists every invoice as a PDF."),
        turn(
            "My key sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c fails, mail me at jo@example.com",
            "Rotate the key under Settings > API keys and retry.",
        ),
        turn("Summarise our chat", "Here is the summary you asked for.", history=long_history),
        turn("Write me an essay", "word " * 600),
        turn("Refund me", "That is not possible.", reward=-1.0, outcome="failure"),
        turn(
            "Can I get a refund for a double charge?",
            "That is not possible.",
            reward=-1.0,
            outcome="failure",
            corrected="Yes: Billing > Payments > Report a problem; refunds take 5-10 days.",
        ),
        turn("Hello?", None),
    )

    dataset = datasets_services.dataset_build(project=project)

    report = dataset.report
    assert report["considered"] == 10
    assert report["dropped"] == {
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "no_answer_to_learn": 1,
        "no_positive_signal": 1,
        "too_long": 1,
    }
    assert report["cut_to_fit"] == 1
    assert report["kept"] == 5 == len(dataset.samples) == len(dataset.trajectory_ids)
    assert {r["kind"]: r["count"] for r in report["redactions"]} == {"api_key": 1, "email": 1}
    assert report["kinds"] == {"corrected": 1, "sft": 4}
    secret_sample = next(
        s for s in dataset.samples if "Rotate the key" in s["messages"][-1]["content"]
    )
    assert "sk-live" not in str(secret_sample) and "jo@example.com" not in str(secret_sample)
    assert "[REDACTED:api_key]" in secret_sample["messages"][-2]["content"]
    cut = next(s for s in dataset.samples if s["messages"][-1]["content"].startswith("Here is"))
    assert cut["messages"][0] == SYSTEM and cut["messages"][1]["role"] == "user"
    assert cut["tokens"] <= 120
    assert "Yes: Billing > Payments > Report a problem; refunds take 5-10 days." in _answers(
        dataset
    )
    assert "That is not possible." not in _answers(dataset)


def _approve(project, slug: str):
    revision = library_services.skill_revision_propose(
        project=project,
        draft=library_services.RevisionDraft(
            slug=slug,
            name=slug.replace("-", " ").title(),
            description=f"When {slug} comes up.",
            instructions="Do the right thing.",
            origin="human",
            author="human",
        ),
    )
    version_services.skill_revision_approve(revision=revision, actor=None, actor_label="test")
    return project.policy_versions.get(status="active")


def _older_generations_and_a_rollback(project) -> None:
    """v1 (no skill), v2 {A}, v3 {A, B} rolled back to v2, v4 = v2's skills + an adapter."""
    v2 = _approve(project, "check-order-id")  # skill set {A}: generation 2
    v3 = _approve(project, "escalate-refunds")  # {A, B}
    version_services.policy_version_rollback(
        to_version=v2, actor=None, actor_label="test", reason="B made refunds worse"
    )
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="adapter-1", base_model="m", changelog="new adapter"
    )
    version_services.policy_version_promote(version=candidate, actor=None, actor_label="test")
    assert (v2.number, v3.number, candidate.number) == (2, 3, 4)


def _one_successful_turn_per_version(project) -> None:
    ingest(
        project,
        turn("Before any skill: where is order 1?", "It shipped.", version=1),
        turn("Unversioned: where is order 2?", "It shipped on Tuesday.", version=None),
        turn("Under v2: where is order 3?", "Order 3 shipped Monday.", version=2),
        turn("Under B (rolled back): where is order 4?", "Escalated.", version=3),
        turn("Under the adapter: where is order 5?", "Order 5 arrives Friday.", version=4),
    )


def test_rewards_from_an_older_skill_generation_or_a_rolled_back_version_are_not_used(project):
    policy_services.idle_policy_update(project=project, objective="rl")
    _older_generations_and_a_rollback(project)
    _one_successful_turn_per_version(project)

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.generation_version == 2
    assert dataset.report["dropped"] == {"rolled_back_version": 1, "stale_generation": 2}
    assert sorted(_answers(dataset)) == ["Order 3 shipped Monday.", "Order 5 arrives Friday."]
    rules = dataset.report["rules"]
    assert rules["reward"]["kept"] == 2 and rules["reward"]["from_older_generations"] == 0
    assert rules["reward"]["dropped"] == {"rolled_back_version": 1, "stale_generation": 2}
    assert rules["target"]["kinds"] == ["corrected"] and rules["target"]["considered"] == 0
    readiness = run_services.project_training_readiness(project=project)
    assert readiness.new_samples == 2


def test_successful_turns_are_targets_kept_across_skill_generations_but_not_rollbacks(project):
    _older_generations_and_a_rollback(project)
    _one_successful_turn_per_version(project)

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.generation_version == 2
    assert dataset.report["dropped"] == {"rolled_back_version": 1}
    assert sorted(_answers(dataset)) == [
        "It shipped on Tuesday.",
        "It shipped.",
        "Order 3 shipped Monday.",
        "Order 5 arrives Friday.",
    ]
    target = dataset.report["rules"]["target"]
    assert target["kinds"] == ["corrected", "sft"]
    assert (target["considered"], target["kept"], target["from_older_generations"]) == (5, 4, 2)
    assert target["dropped"] == {"rolled_back_version": 1}
    readiness = run_services.project_training_readiness(project=project)
    assert readiness.new_samples == 4
    counts = {r.rule.name: r for r in readiness.by_rule}
    assert counts["target"].usable == 4 and counts["target"].older_generations == 2
    assert counts["target"].left_out == {"rolled_back_version": 1}


def test_the_split_is_by_session_and_the_snapshot_is_reproducible(project):
    policy_services.idle_policy_update(project=project, eval_fraction=0.3)
    items = [
        turn(
            f"Tell me about {WORDS[s * 3 + t]}",
            f"{WORDS[s * 3 + t].title()} is fine.",
            session=f"s{s}",
        )
        for s in range(12)
        for t in range(3)
    ]
    ingest(project, *items)

    first = datasets_services.dataset_build(project=project)
    second = datasets_services.dataset_build(project=project)

    by_session: dict[str, set[str]] = {}
    for sample in first.samples:
        by_session.setdefault(sample["session"], set()).add(sample["split"])
    assert all(len(splits) == 1 for splits in by_session.values())
    assert first.train_count > 0 and first.eval_count > 0
    assert first.train_count + first.eval_count == 36
    assert first.content_hash == second.content_hash


def test_rl_datasets_keep_rewarded_answers_grouped_by_prompt(project):
    policy_services.idle_policy_update(project=project, objective="rl")
    ingest(
        project,
        turn("Where is my parcel?", "Tracking says Friday.", reward=1.0, session="a"),
        turn("Where is my parcel?", "No idea.", reward=-1.0, outcome="failure", session="b"),
        turn("Cancel my plan", "Plans cancel under Billing.", reward=0.5, session="c"),
        turn("Anything else?", "Maybe.", reward=None, outcome="unknown", session="d"),
    )

    dataset = datasets_services.dataset_build(project=project)

    rows = {s["messages"][-1]["content"]: s for s in dataset.samples}
    assert set(rows) == {"Tracking says Friday.", "No idea.", "Plans cancel under Billing."}
    assert rows["No idea."]["kind"] == "rl" and rows["No idea."]["reward"] == -1.0
    assert rows["No idea."]["group"] == rows["Tracking says Friday."]["group"] is not None
    assert rows["Plans cancel under Billing."]["group"] is None
    assert dataset.report["dropped"] == {"no_positive_signal": 1}


def test_the_token_budget_keeps_the_newest_samples(project):
    policy_services.idle_policy_update(project=project, max_tokens_per_run=60)
    ingest(
        project,
        *[
            turn(f"Tell me about {WORDS[i]}", f"All about {WORDS[i]}: {WORDS[i + 10]} and more.")
            for i in range(6)
        ],
    )

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.report["tokens"] <= 60
    assert dataset.report["dropped"]["over_token_budget"] >= 1
    assert dataset.samples[-1]["messages"][-1]["content"].startswith(f"All about {WORDS[5]}")


def test_demo_data_loads_once_and_gives_the_cleaning_report_content(project):
    created = demo_trajectories_load(project, count=200)
    again = demo_trajectories_load(project, count=200)

    dataset = datasets_services.dataset_build(project=project)

    assert created == 210 and again == 0
    dropped = dataset.report["dropped"]
    assert dropped["exact_duplicate"] >= 5
    assert dropped["near_duplicate"] >= 1
    assert dropped["no_positive_signal"] >= 10
    assert dataset.report["redactions"]
    assert dataset.report["kinds"]["corrected"] >= 1
    assert dataset.train_count > dataset.eval_count > 0


def failure(
    question: str,
    answer: str,
    *,
    session: str = "",
    version: int | None = 1,
    reward: float | None = None,
    corrected: str = "",
    error: str = "",
) -> IncidentIn:
    n = next(_ids)
    return IncidentIn.model_validate(
        factories.incident_payload(
            f"i-{n}",
            kind="wrong_answer",
            error={"type": "WrongAnswer", "message": error or f"wrong answer {n}"},
            messages=[
                SYSTEM,
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            feedback={"text": "Not what I asked", "score": -1, "reward": reward},
            metadata={"corrected_answer": corrected} if corrected else {},
            session_id=session,
            policy_version=version,
            occurred_at=timezone.now() - timedelta(hours=1) + timedelta(seconds=n),
        )
    )


def report_incidents(project, *items: IncidentIn) -> None:
    incidents_ingest(project=project, items=list(items))


def test_rl_datasets_take_incidents_as_negative_samples_cleaned_like_trajectories(project):
    policy_services.idle_policy_update(project=project, objective="rl")
    ingest(project, turn("Where is my parcel?", "Tracking says Friday.", session="a"))
    report_incidents(
        project,
        failure("Where is my parcel?", "I cannot know that.", session="b"),
        failure("Cancel my plan", "Plans never cancel.", reward=-0.5, version=None),
        failure(
            "My key sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c fails",
            "Keys never fail.",
            corrected="Rotate the key under Settings > API keys.",
        ),
        failure("Export my invoices", "Exports are gone."),
        failure("Export my invoices", "Exports are gone."),
    )
    ignored = failure("Is this a bug?", "It is not.", error="not a bug at all")
    report_incidents(project, ignored)
    Incident.objects.filter(project=project, client_id=ignored.id).update(status="ignored")

    dataset = datasets_services.dataset_build(project=project)

    rows = {s["messages"][-1]["content"]: s for s in dataset.samples}
    assert set(rows) == {
        "Tracking says Friday.",
        "I cannot know that.",
        "Plans never cancel.",
        "Rotate the key under Settings > API keys.",
        "Exports are gone.",
    }
    wrong = rows["I cannot know that."]
    assert (
        wrong["kind"] == "incident" and wrong["reward"] == datasets_services.INCIDENT_DEFAULT_REWARD
    )
    assert wrong["trajectory_id"] is None and wrong["incident_id"]
    # The failure and the good answer to the same prompt share the RL baseline.
    assert wrong["group"] == rows["Tracking says Friday."]["group"] is not None
    assert rows["Plans never cancel."]["reward"] == -0.5
    corrected = rows["Rotate the key under Settings > API keys."]
    assert corrected["kind"] == "corrected" and corrected["reward"] == 1.0
    assert "sk-live" not in str(corrected) and "[REDACTED:api_key]" in str(corrected)
    report = dataset.report
    assert report["considered"] == 1 and report["incidents_considered"] == 6
    assert report["incidents"] == 4 == len(dataset.incident_ids)
    assert report["dropped"] == {"exact_duplicate": 1, "ignored_incident": 1}
    assert report["kinds"] == {"corrected": 1, "incident": 3, "sft": 1}
    assert sorted(dataset.incident_ids) == sorted(
        s["incident_id"] for s in dataset.samples if s["incident_id"]
    )
    assert len(dataset.trajectory_ids) == 1


def test_sft_datasets_use_an_incident_only_with_a_corrected_answer(project):
    ingest(project, turn("Where are my invoices?", "Billing > Invoices."))
    report_incidents(
        project,
        failure("Where is my parcel?", "I cannot know that."),
        failure("Refund me", "No.", corrected="Refunds are under Billing > Payments."),
    )

    dataset = datasets_services.dataset_build(project=project)

    assert sorted(_answers(dataset)) == [
        "Billing > Invoices.",
        "Refunds are under Billing > Payments.",
    ]
    assert dataset.report["dropped"] == {"incident_not_corrected": 1}
    assert dataset.report["kinds"] == {"corrected": 1, "sft": 1}
    assert dataset.report["incidents"] == 1
    assert run_services.project_training_readiness(project=project).new_samples == 2


def test_corrected_incidents_survive_skill_changes_and_uncorrected_ones_do_not(project):
    policy_services.idle_policy_update(project=project, objective="rl")
    v2 = _approve(project, "check-order-id")
    v3 = _approve(project, "escalate-refunds")
    version_services.policy_version_rollback(
        to_version=v2, actor=None, actor_label="test", reason="B made refunds worse"
    )
    assert (v2.number, v3.number) == (2, 3)
    fix = "Order {n} ships Monday."
    report_incidents(
        project,
        *[
            failure(f"Where is order {n}?", "Lost.", version=version, corrected=fix.format(n=n))
            for n, version in ((1, 1), (2, None), (3, 2), (4, 3))
        ],
        *[
            failure(f"Where is parcel {n}?", f"Parcel {n} is gone.", version=version)
            for n, version in ((5, 1), (6, 2), (7, 3))
        ],
    )

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.report["dropped"] == {"rolled_back_version": 2, "stale_generation": 1}
    assert _answers(dataset) == [
        "Order 1 ships Monday.",
        "Order 2 ships Monday.",
        "Order 3 ships Monday.",
        "Parcel 6 is gone.",
    ]
    assert dataset.report["incidents_considered"] == 7
    rules = dataset.report["rules"]
    assert rules["target"]["kept"] == 3 and rules["target"]["from_older_generations"] == 2
    assert rules["target"]["dropped"] == {"rolled_back_version": 1}
    assert rules["reward"]["kinds"] == ["sft", "rl", "incident"]
    assert rules["reward"]["kept"] == 1
    assert rules["reward"]["dropped"] == {"rolled_back_version": 1, "stale_generation": 1}
    assert run_services.project_training_readiness(project=project).new_samples == 4
