"""A canary for agents that fetch their policy themselves (``GET /api/v1/runtime/policy``), not
through the proxy: a session named by ``X-Session-Id`` (or ``?session_id=``) gets its arm's
version, the same on every request, on both doors (Django's and the ASGI fast lane); the arm is
in ``X-MetaClaw-Canary`` and each arm has its own ETag. Turns and incidents that such an agent
reports with its session but without a version count to the arm that served the session."""

from __future__ import annotations

import urllib.request

import pytest

from skills.versions.models import PolicyVersion
from skills.versions.services import (
    policy_version_create_candidate,
    policy_version_rollback,
    skill_revision_approve,
)
from tests import factories
from tests.asgi_server import asgi_server

pytestmark = pytest.mark.django_db(transaction=True)

SKILL = (
    "search-orders-dates",
    "Search orders with ISO dates",
    "When the search_orders tool rejects a relative date like 'last week' or 'yesterday'.",
    "Convert relative dates to ISO 8601 before calling search_orders.",
)
SESSIONS = 200


@pytest.fixture
def keys(project, fresh_runtime_caches):
    return {
        "runtime": factories.make_key(project, scopes=["runtime"]),
        "ingest": factories.make_key(project, scopes=["ingest"]),
        "admin": factories.make_key(project, scopes=["admin"]),
    }


@pytest.fixture
def canary(api, project, keys) -> PolicyVersion:
    """v3, a candidate holding the skill, served to half of the sessions; v1 (active, no skill)
    to the others."""
    revision = factories.make_human_revision(project, SKILL)
    skill_revision_approve(revision=revision, actor=None, actor_label="test")
    policy_version_rollback(
        to_version=PolicyVersion.objects.get(project=project, number=1), actor=None, reason="x"
    )
    version = policy_version_create_candidate(project=project, revisions=[revision])
    body = {"version": version.number, "share_percent": 50, "margin_per_1000": 100,
            "min_turns": 10}  # fmt: skip
    response = api.post("/api/v1/canary", body, key=keys["admin"])
    assert response.status_code == 201, response.content
    return version


def _policy(client, key: str, session: str | None = None, *, by: str = "header", **params):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    if session is not None and by == "header":
        headers["HTTP_X_SESSION_ID"] = session
    elif session is not None:
        params["session_id"] = session
    response = client.get("/api/v1/runtime/policy", data=params, **headers)
    assert response.status_code == 200, response.content
    return response


def test_half_the_sessions_get_the_canary_each_always_the_same_with_its_own_etag(
    client, keys, canary
):
    first = {f"session-{i}": _policy(client, keys["runtime"], f"session-{i}")
             for i in range(SESSIONS)}  # fmt: skip
    again = {s: _policy(client, keys["runtime"], s, by="query") for s in first}

    arms = {s: r["X-MetaClaw-Canary"] for s, r in first.items()}
    in_canary = [s for s, arm in arms.items() if arm == "canary"]
    print(f"\n50 % canary: {len(in_canary)} of {SESSIONS} sessions in the canary arm")
    assert 70 <= len(in_canary) <= 130  # half, give or take the hash
    for session, response in first.items():
        # The same arm on every request of the session, by header or by query parameter.
        assert again[session]["X-MetaClaw-Canary"] == arms[session]
        assert again[session]["ETag"] == response["ETag"]
        version = response.json()["version"]
        assert version == (canary.number if arms[session] == "canary" else 1)
        assert response["X-MetaClaw-Policy-Version"] == str(version)
        assert [s["slug"] for s in response.json()["skills"]] == (
            [SKILL[0]] if arms[session] == "canary" else []
        )
        assert "X-Session-Id" in response["Vary"]
    etags = {arm: {first[s]["ETag"] for s in first if arms[s] == arm} for arm in arms.values()}
    assert len(etags["canary"]) == len(etags["control"]) == 1
    assert etags["canary"] != etags["control"]

    # Each arm's ETag answers 304 to a session of that arm.
    session = in_canary[0]
    cached = client.get(
        "/api/v1/runtime/policy",
        HTTP_AUTHORIZATION=f"Bearer {keys['runtime']}",
        HTTP_X_SESSION_ID=session,
        HTTP_IF_NONE_MATCH=first[session]["ETag"],
    )
    assert cached.status_code == 304 and cached["X-MetaClaw-Canary"] == "canary"

    # No session: the active version, no arm. A pinned version wins over the arm.
    plain = _policy(client, keys["runtime"])
    assert plain.json()["version"] == 1 and not plain.has_header("X-MetaClaw-Canary")
    pinned = _policy(client, keys["runtime"], session, version=1)
    assert pinned.json()["version"] == 1 and not pinned.has_header("X-MetaClaw-Canary")


def test_the_fast_lane_gives_each_session_the_same_arm_as_django(client, keys, canary):
    sessions = [f"lane-{i}" for i in range(30)]
    django_arms = {s: _policy(client, keys["runtime"], s)["X-MetaClaw-Canary"] for s in sessions}
    with asgi_server() as base:
        lane = {}
        for i, session in enumerate(sessions):
            url = f"{base}/api/v1/runtime/policy"
            headers = {"Authorization": f"Bearer {keys['runtime']}"}
            if i % 2:
                url += f"?session_id={session}"
            else:
                headers["X-Session-Id"] = session
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as answer:
                lane[session] = (answer.headers["X-MetaClaw-Canary"], answer.headers["ETag"])
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{base}/api/v1/runtime/policy?session_id=",
                headers={"Authorization": f"Bearer {keys['runtime']}"},
            )
        ) as answer:
            pass
    assert {s: arm for s, (arm, _) in lane.items()} == django_arms
    assert len({etag for _, etag in lane.values()}) == 2
    assert answer.status == 200 and answer.headers["X-MetaClaw-Canary"] is None


def test_a_session_id_that_is_not_printable_is_refused_naming_the_field(client, keys, canary):
    response = client.get(
        "/api/v1/runtime/policy",
        {"session_id": "bad\nid"},
        HTTP_AUTHORIZATION=f"Bearer {keys['runtime']}",
    )
    assert response.status_code == 422
    assert "session_id" in response.content.decode()


def test_turns_and_incidents_reported_with_the_session_only_count_to_its_arm(
    api, client, keys, canary
):
    """An agent without the proxy: it fetches its policy per session, reports each session's
    turn (no version) and, for the canary's sessions, a failure with the session id only."""
    arms = {}
    for i in range(40):
        session = f"agent-{i}"
        arms[session] = _policy(client, keys["runtime"], session)["X-MetaClaw-Canary"]
    turns = [{"id": f"turn-{s}", "session_id": s, "agent": {"name": "support-bot"},
              "messages": [{"role": "user", "content": "Where is my order?"}]}
             for s in arms]  # fmt: skip
    answer = api.post("/api/v1/trajectories/batch", {"items": turns}, key=keys["ingest"])
    assert answer.status_code == 207, answer.content
    in_canary = [s for s, arm in arms.items() if arm == "canary"]
    for session in in_canary:
        payload = factories.incident_payload(f"fail-{session}", session_id=session)
        assert api.post("/api/v1/incidents", payload, key=keys["ingest"]).status_code < 300

    status = api.get("/api/v1/canary", key=keys["admin"]).json()
    assert status["canary"]["turns"] == len(in_canary)
    assert status["canary"]["incidents"] == len(in_canary)
    assert status["control_arm"]["turns"] == len(arms) - len(in_canary)
    assert status["control_arm"]["incidents"] == 0
    assert status["canary"]["rate"] == 1000.0
