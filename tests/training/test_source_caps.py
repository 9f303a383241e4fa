"""Issue 22, item 4: the slow loop keeps each sample's source, caps any one source's share of
a dataset, reports what it dropped, and leaves out sessions and end users marked abusive."""

from __future__ import annotations

import pytest

from incidents.models import Trajectory
from training.datasets import services as datasets_services

pytestmark = pytest.mark.django_db

TOPICS = (
    "invoices refunds passwords webhooks exports invitations billing security tokens domains "
    "backups alerts dashboards reports quotas regions storage logging metrics tracing"
).split()


def turn(n: int, *, session: str, **extra) -> dict:
    topic = TOPICS[n]
    return {
        "id": f"t-{n}",
        "session_id": session,
        "policy_version": 1,
        "messages": [
            {"role": "user", "content": f"How do I configure {topic} for my account?"},
            {"role": "assistant", "content": f"Open settings, then {topic}, then save ({n})."},
        ],
        "reward": 1.0,
        "outcome": "success",
        "occurred_at": f"2026-01-01T00:00:{n:02d}Z",
        **extra,
    }


def send(api, key, items) -> None:
    response = api.post("/api/v1/trajectories/batch", {"items": items}, key=key)
    assert response.status_code == 207, response.content
    assert response.json()["accepted"] == len(items)


def test_one_persistent_user_is_capped_and_the_report_says_what_was_dropped(
    api, project, ingest_key, settings
):
    settings.METACLAW = {
        **settings.METACLAW,
        "DATASET_MAX_SOURCE_SHARE": 0.25,
        "DATASET_SOURCE_FLOOR": 2,
    }
    # Eight turns of one end user (in eight sessions: the end user is the source), eight of
    # eight other sessions.
    loud = [turn(n, session=f"loud-{n}", user="u-loud") for n in range(8)]
    others = [turn(n, session=f"s-{n}") for n in range(8, 16)]
    send(api, ingest_key, loud + others)
    assert Trajectory.objects.filter(end_user="u-loud").count() == 8
    assert Trajectory.objects.exclude(api_key_id=None).count() == 16

    dataset = datasets_services.dataset_build(project=project)

    sources = dataset.report["sources"]
    assert sources["cap"] == 4  # a quarter of 16
    assert sources["capped"] == {"user:u-loud": 4}
    assert sources["capped_sources"] == 1
    assert dataset.report["dropped"]["source_cap"] == 4
    assert dataset.report["kept"] == 12
    kept_loud = [s for s in dataset.samples if s["source"]["end_user"] == "u-loud"]
    # The newest four of the loud user's turns stay.
    assert sorted(s["trajectory_id"] for s in kept_loud) == sorted(
        str(t.pk) for t in Trajectory.objects.filter(client_id__in=["t-4", "t-5", "t-6", "t-7"])
    )
    sample = dataset.samples[0]
    assert set(sample["source"]) == {"session", "end_user", "api_key_id", "agent"}
    assert sample["source"]["api_key_id"] is not None


def test_the_default_cap_leaves_a_small_dataset_alone(api, project, ingest_key):
    send(api, ingest_key, [turn(n, session="one-session") for n in range(10)])

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.report["kept"] == 10
    assert dataset.report["sources"]["capped"] == {}
    assert dataset.report["sources"]["cap"] == 20  # the floor


def test_a_session_marked_abusive_leaves_later_datasets(api, project, ingest_key, admin_key):
    send(api, ingest_key, [turn(n, session=f"s-{n % 3}") for n in range(6)])
    before = datasets_services.dataset_build(project=project)
    assert before.report["kept"] == 6

    response = api.post(
        "/api/v1/abusive-sources",
        {"kind": "session", "value": "s-1", "reason": "prompt injection"},
        key=admin_key,
    )
    assert response.status_code == 201, response.content

    after = datasets_services.dataset_build(project=project)
    assert after.report["kept"] == 4
    assert after.report["dropped"]["abusive_source"] == 2
    assert after.report["sources"]["abusive_dropped"] == {"session:s-1": 2}
    assert all(s["session"] != "s-1" for s in after.samples)
