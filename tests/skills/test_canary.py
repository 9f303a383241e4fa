"""Canary releases through the public API: sessions hashed to the canary through the proxy
(stable per session), incidents reported by the agent with the version that served it, the
periodic check that rolls the canary back automatically (audited, notified) when the fake
upstream fails more often with the canary's skill, and does not when it fails no more often
or when the evidence is too thin."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.core import mail
from django.test import AsyncClient

from base.models import AuditEvent
from incidents.models import Trajectory
from skills.approvals.models import Notification
from skills.canary.models import CanaryOutcome, CanaryRelease
from skills.canary.tasks import check_canaries
from skills.runtime import recording
from skills.versions.models import PolicyVersion
from skills.versions.services import policy_version_rollback, skill_revision_approve
from tests import factories
from tests.fakes.skill_sensitive_upstream import FAILED, SkillSensitiveUpstream

pytestmark = pytest.mark.django_db(transaction=True)

HARMFUL = (
    "search-orders-dates",
    "Search orders with ISO dates",
    "When the search_orders tool rejects a relative date like 'last week' or 'yesterday'.",
    "Convert relative dates to ISO 8601 before calling search_orders. MARK-HARMFUL",
)
NEUTRAL = (*HARMFUL[:3], "Convert relative dates to ISO 8601 before calling search_orders.")


@pytest.fixture
def upstream():
    with SkillSensitiveUpstream(base_rate=0.1, rates={"MARK-HARMFUL": 0.7}) as server:
        yield server


@pytest.fixture
def project(db, upstream, fresh_runtime_caches):
    project = factories.make_project(upstream_base_url=upstream.base_url, upstream_api_key="u")
    yield project
    recording.recordings_wait(5)


@pytest.fixture
def keys(project):
    return {
        "runtime": factories.make_key(project, scopes=["runtime"]),
        "ingest": factories.make_key(project, scopes=["ingest"]),
        "admin": factories.make_key(project, scopes=["admin"]),
    }


def candidate(project, skill) -> PolicyVersion:
    """v3, a candidate holding ``skill``, built on v1 (active, no skills)."""
    from skills.versions.services import policy_version_create_candidate

    revision = factories.make_human_revision(project, skill)
    skill_revision_approve(revision=revision, actor=None, actor_label="test")
    v1 = PolicyVersion.objects.get(project=project, number=1)
    policy_version_rollback(to_version=v1, actor=None, reason="set-up")
    return policy_version_create_candidate(project=project, revisions=[revision])


def chat(key: str, session: str):
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": (
        f"Find my orders since last week, the search_orders tool says invalid date ({session})"
    )}]}  # fmt: skip
    return async_to_sync(AsyncClient().post)(
        "/v1/chat/completions",
        data=body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}", "X-Session-Id": session},
    )


def agent_traffic(api, keys, sessions: int) -> dict[str, int]:
    """Each session: one turn through the proxy; a failed answer is reported as an incident
    with the version that served it (the proxy's header). Returns the turns per arm."""
    arms = {"canary": 0, "control": 0}
    for i in range(sessions):
        session = f"session-{i}"
        response = chat(keys["runtime"], session)
        assert response.status_code == 200, response.content
        arms[response["X-MetaClaw-Canary"]] += 1
        answer = json.loads(response.content)["choices"][0]["message"]["content"]
        if FAILED in answer:
            payload = factories.incident_payload(
                f"fail-{session}",
                policy_version=int(response["X-MetaClaw-Policy-Version"]),
                session_id=session,
            )
            assert api.post("/api/v1/incidents", payload, key=keys["ingest"]).status_code < 300
    assert recording.recordings_wait(10)
    return arms


def start(api, keys, number: int, **figures):
    body = {"version": number, "share_percent": 50, "margin_per_1000": 100, "min_turns": 25}
    response = api.post("/api/v1/canary", {**body, **figures}, key=keys["admin"])
    assert response.status_code == 201, response.content
    return response.json()


def test_sessions_are_hashed_to_the_canary_stably_and_each_turn_records_its_arm(
    api, project, keys, upstream
):
    version = candidate(project, NEUTRAL)
    start(api, keys, version.number, share_percent=30)

    served = {f"s{i}": chat(keys["runtime"], f"s{i}") for i in range(40)}
    again = {s: chat(keys["runtime"], s) for s in served}
    assert recording.recordings_wait(10)

    for session, response in served.items():
        assert response["X-MetaClaw-Policy-Version"] == again[session]["X-MetaClaw-Policy-Version"]
        arm = response["X-MetaClaw-Canary"]
        assert response["X-MetaClaw-Policy-Version"] == ("3" if arm == "canary" else "1")
    in_canary = [s for s, r in served.items() if r["X-MetaClaw-Canary"] == "canary"]
    assert 4 <= len(in_canary) <= 20  # 30 % of 40, give or take the hash
    recorded = dict(
        Trajectory.objects.filter(project=project).values_list("session_id", "policy_version")
    )
    assert {s for s, v in recorded.items() if v == 3} == set(in_canary)
    # Only the canary's requests carried its skill.
    with_skill = [r for r in upstream.chat_requests() if "Search orders with ISO dates"
                  in r.body["messages"][0]["content"]]  # fmt: skip
    assert len(with_skill) == 2 * len(in_canary)

    response = api.post("/api/v1/canary/stop", {"reason": "enough"}, key=keys["admin"])
    assert response.status_code == 200
    assert response.json()["outcome"] == "stopped"
    assert chat(keys["runtime"], in_canary[0])["X-MetaClaw-Policy-Version"] == "1"
    assert PolicyVersion.objects.get(project=project, number=3).status == "candidate"


def test_a_canary_that_fails_more_often_is_rolled_back_automatically_audited_and_notified(
    api, project, keys
):
    version = candidate(project, HARMFUL)
    start(api, keys, version.number)
    arms = agent_traffic(api, keys, 80)
    assert min(arms.values()) >= 25
    project.notify_emails = "ops@example.com"
    project.save(update_fields=["notify_emails"])

    check_canaries()

    canary = CanaryRelease.objects.get(project=project)
    assert canary.outcome == CanaryOutcome.ROLLED_BACK
    assert canary.ended_by_label == "canary check"
    assert canary.figures["canary"]["rate"] > canary.figures["control"]["rate"] + 100
    assert canary.figures["canary"]["turns"] == arms["canary"]
    event = AuditEvent.objects.get(project=project, action="canary.rolled_back")
    assert event.after["figures"]["rollback"] is True
    assert "per 1,000" in event.message
    note = Notification.objects.get(project=project, kind="decision")
    assert note.version is None and note.recipient == "ops@example.com"
    sent = [m for m in mail.outbox if m.subject.startswith("MetaClaw: Canary")]
    assert [m.subject for m in sent] == [f"MetaClaw: Canary of v{version.number} rolled back "
                                         "automatically"]  # fmt: skip
    assert "incidents in" in sent[0].body
    # Every session is back on the active version; the candidate waits for a person.
    assert chat(keys["runtime"], "session-after")["X-MetaClaw-Policy-Version"] == "1"
    assert PolicyVersion.objects.get(pk=version.pk).status == "candidate"
    status = api.get("/api/v1/canary", key=keys["admin"]).json()
    assert status["outcome"] == "rolled_back" and status["rollback"] is True


def test_a_canary_no_worse_than_control_keeps_running(api, project, keys):
    version = candidate(project, NEUTRAL)
    start(api, keys, version.number)
    agent_traffic(api, keys, 80)

    check_canaries()

    canary = CanaryRelease.objects.get(project=project)
    assert canary.outcome == CanaryOutcome.RUNNING
    assert canary.figures["enough_evidence"] is True and canary.figures["rollback"] is False
    assert not AuditEvent.objects.filter(action="canary.rolled_back").exists()
    assert not Notification.objects.filter(project=project).exists()


def test_a_worse_canary_is_not_rolled_back_before_there_is_enough_evidence(api, project, keys):
    version = candidate(project, HARMFUL)
    start(api, keys, version.number, min_turns=500)
    agent_traffic(api, keys, 40)

    check_canaries()

    status = api.get("/api/v1/canary", key=keys["admin"]).json()
    assert status["outcome"] == "running"
    assert status["enough_evidence"] is False
    assert status["canary"]["rate"] > status["control_arm"]["rate"]


def test_promoting_the_canary_makes_its_version_active_for_everyone(api, project, keys):
    version = candidate(project, NEUTRAL)
    start(api, keys, version.number)
    refused = api.post("/api/v1/canary", {"version": version.number}, key=keys["admin"])
    assert refused.status_code == 409  # one canary at a time

    response = api.post("/api/v1/canary/promote", {"reason": "looks good"}, key=keys["admin"])

    assert response.status_code == 200, response.content
    assert response.json()["outcome"] == "promoted"
    assert PolicyVersion.objects.get(pk=version.pk).status == "active"
    assert chat(keys["runtime"], "anyone")["X-MetaClaw-Policy-Version"] == str(version.number)
    assert api.post("/api/v1/canary/stop", {}, key=keys["admin"]).status_code == 404


def test_only_a_candidate_goes_to_a_canary_and_only_admins_start_one(api, project, keys):
    assert api.post("/api/v1/canary", {"version": 1}, key=keys["admin"]).status_code == 409
    assert api.post("/api/v1/canary", {"version": 1}, key=keys["runtime"]).status_code == 403
    assert not CanaryRelease.objects.exists()
