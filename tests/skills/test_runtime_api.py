"""The runtime API agents pull from: the policy (ETag, pin), skill retrieval, session feedback."""

from __future__ import annotations

import time

import pytest

from base import counters
from incidents.ingest import trajectories_ingest
from incidents.models import Incident, Outcome, Trajectory
from incidents.schemas import TrajectoryIn
from skills.runtime import feedback, policy, retrieval
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.services import skill_revision_approve
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_runtime_caches")]

DATES = (
    "search-orders-dates",
    "Search orders with ISO dates",
    "When the search_orders tool rejects a relative date like 'last week' or 'yesterday'.",
    "Convert relative dates to ISO 8601 (YYYY-MM-DD) before calling search_orders; "
    "never pass words like 'last week' as the since argument.",
)
REFUNDS = (
    "refund-policy",
    "Check refund eligibility",
    "When a customer asks for a refund or their money back.",
    "Look up the order age first: refunds are possible within 30 days. Never promise a refund "
    "before checking.",
)
PYTHON = (
    "python-import-errors",
    "Fix Python import errors",
    "When a Python script fails with ImportError or ModuleNotFoundError.",
    "Check that the virtual environment is active and the package is installed in it.",
)


def approve(project, skill, django_capture_on_commit_callbacks):
    revision = factories.make_human_revision(project, skill)
    with django_capture_on_commit_callbacks(execute=True):
        skill_revision_approve(revision=revision, actor=None, actor_label="test")
    return revision


@pytest.fixture
def library(project, django_capture_on_commit_callbacks):
    """Three approved skills: versions 2, 3 and 4 (4 active)."""
    return [
        approve(project, s, django_capture_on_commit_callbacks) for s in (DATES, REFUNDS, PYTHON)
    ]


# --- Policy -------------------------------------------------------------------------------


def test_policy_returns_the_active_version_with_skill_texts_and_an_etag(
    api, project, runtime_key, library
):
    response = api.get("/api/v1/runtime/policy", key=runtime_key)

    assert response.status_code == 200
    body = response.json()
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    assert body["version"] == active.number == 4
    assert body["status"] == "active"
    assert {s["slug"] for s in body["skills"]} == {DATES[0], REFUNDS[0], PYTHON[0]}
    dates = next(s for s in body["skills"] if s["slug"] == DATES[0])
    assert dates["instructions"] == DATES[3]
    assert dates["description"] == DATES[2]
    assert response["ETag"] == body["etag"]
    assert response["X-MetaClaw-Policy-Version"] == "4"


def test_policy_answers_304_to_a_matching_if_none_match(api, project, runtime_key, library):
    etag = api.get("/api/v1/runtime/policy", key=runtime_key)["ETag"]

    again = api.client.get(
        "/api/v1/runtime/policy",
        HTTP_AUTHORIZATION=f"Bearer {runtime_key}",
        HTTP_IF_NONE_MATCH=etag,
    )

    assert again.status_code == 304
    assert again.content == b""
    assert again["ETag"] == etag
    assert again["X-MetaClaw-Policy-Version"] == "4"


def test_an_approval_changes_the_policy_and_its_etag_at_once(
    api, project, runtime_key, django_capture_on_commit_callbacks
):
    approve(project, DATES, django_capture_on_commit_callbacks)
    first = api.get("/api/v1/runtime/policy", key=runtime_key)

    approve(project, REFUNDS, django_capture_on_commit_callbacks)
    second = api.client.get(
        "/api/v1/runtime/policy",
        HTTP_AUTHORIZATION=f"Bearer {runtime_key}",
        HTTP_IF_NONE_MATCH=first["ETag"],
    )

    assert second.status_code == 200
    assert second.json()["version"] == first.json()["version"] + 1
    assert second["ETag"] != first["ETag"]
    assert len(second.json()["skills"]) == 2


def test_a_change_made_by_another_process_is_seen_after_one_sync(
    api, project, runtime_key, library
):
    assert api.get("/api/v1/runtime/policy", key=runtime_key).json()["version"] == 4
    # Another web process rolls back: the database changes and the generation in Redis moves,
    # but this process's signal receivers never run.
    PolicyVersion.objects.filter(project=project, number=4).update(status=VersionStatus.RETIRED)
    PolicyVersion.objects.filter(project=project, number=3).update(status=VersionStatus.ACTIVE)
    counters.redis_client().incr(policy.GENERATION_KEY.format(project_id=project.pk))

    stale = api.get("/api/v1/runtime/policy", key=runtime_key).json()["version"]
    policy.sync_now()
    fresh = api.get("/api/v1/runtime/policy", key=runtime_key).json()["version"]

    assert stale == 4  # served from memory until the syncer (every 0.25 s) notices
    assert fresh == 3


def test_policy_can_be_pinned_to_an_older_version(api, project, runtime_key, library):
    response = api.get("/api/v1/runtime/policy", key=runtime_key, version=2)

    assert response.status_code == 200
    body = response.json()
    assert body["version"] == 2
    assert body["status"] == "retired"
    assert [s["slug"] for s in body["skills"]] == [DATES[0]]
    assert response["X-MetaClaw-Policy-Version"] == "2"


def test_pinning_an_unknown_or_foreign_version_answers_404(
    api, project, other_project, runtime_key, library, django_capture_on_commit_callbacks
):
    for _ in range(6):  # the other project has versions up to 7
        approve(other_project, ("s" + str(_),) + DATES[1:], django_capture_on_commit_callbacks)

    response = api.get("/api/v1/runtime/policy", key=runtime_key, version=7)

    assert response.status_code == 404
    assert response.json()["errors"][0]["field"] == "version"


def test_policy_needs_a_runtime_key(api, project, ingest_key):
    assert api.get("/api/v1/runtime/policy").status_code == 401
    assert api.get("/api/v1/runtime/policy", key="mc_nope_nope").status_code == 401
    refused = api.get("/api/v1/runtime/policy", key=ingest_key)
    assert refused.status_code == 403
    assert "runtime" in refused.json()["detail"]


def test_runtime_requests_are_counted_as_project_traffic(api, project, runtime_key):
    for _ in range(3):
        api.get("/api/v1/runtime/policy", key=runtime_key)
    policy.sync_now()

    assert counters.traffic_per_minute(project_id=project.pk, minutes=1)[-1] == 3


def test_policy_requests_over_the_rate_limit_answer_429(api, project, runtime_key):
    project.rate_limit_per_minute = 2
    project.save(update_fields=["rate_limit_per_minute"])

    # The limit counts per clock minute: requests that straddle a minute boundary start a new
    # count, so wait out the last second of a minute first.
    while time.time() % 60 > 58.5:
        time.sleep(0.1)
    statuses = [api.get("/api/v1/runtime/policy", key=runtime_key).status_code for _ in range(3)]

    assert statuses == [200, 200, 429]


# --- Retrieval ----------------------------------------------------------------------------


def test_retrieve_ranks_the_relevant_skill_first_with_its_score(api, runtime_key, library):
    response = api.post(
        "/api/v1/runtime/skills/retrieve",
        {"query": "The customer wants their money back for an order, can they get a refund?"},
        key=runtime_key,
    )

    assert response.status_code == 200
    body = response.json()
    assert body["policy_version"] == 4
    assert body["skills"][0]["slug"] == REFUNDS[0]
    assert body["skills"][0]["instructions"] == REFUNDS[3]
    scores = [s["score"] for s in body["skills"]]
    assert scores == sorted(scores, reverse=True)
    assert all(score >= retrieval.DEFAULT_MIN_SCORE for score in scores)


def test_retrieve_takes_the_latest_user_request_not_framework_boilerplate(
    api, runtime_key, library
):
    boilerplate = (
        "Conversation info (untrusted metadata):\n```json\n"
        '{"channel": "refunds-desk", "topic": "refund money back policy"}\n```\n'
        "[Tue 2026-11-25 20:31 UTC] "
    )
    messages = [
        {"role": "system", "content": "You are the refunds desk. Refunds and money back."},
        {"role": "user", "content": boilerplate + "I want a refund, give my money back"},
        {"role": "assistant", "content": "Which order?"},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": boilerplate
                    + "my python script crashes with ModuleNotFoundError when importing requests",
                }
            ],
        },
    ]

    body = api.post(
        "/api/v1/runtime/skills/retrieve", {"messages": messages, "k": 1}, key=runtime_key
    ).json()

    assert "untrusted metadata" not in body["query"]
    assert body["query"].startswith("my python script")
    assert [s["slug"] for s in body["skills"]] == [PYTHON[0]]


def test_retrieve_applies_min_score_and_token_budget(api, runtime_key, library):
    query = {"query": "search orders since last week failed: invalid date"}
    everything = api.post(
        "/api/v1/runtime/skills/retrieve", {**query, "min_score": -1, "k": 10}, key=runtime_key
    ).json()
    strict = api.post(
        "/api/v1/runtime/skills/retrieve", {**query, "min_score": 0.99}, key=runtime_key
    ).json()
    first_tokens = everything["skills"][0]["tokens"]
    budget = api.post(
        "/api/v1/runtime/skills/retrieve",
        {**query, "min_score": -1, "k": 10, "token_budget": first_tokens},
        key=runtime_key,
    ).json()

    assert len(everything["skills"]) == 3
    assert everything["skills"][0]["slug"] == DATES[0]
    assert strict["skills"] == []
    assert budget["tokens"] <= first_tokens
    assert budget["skills"][0]["slug"] == DATES[0]


def test_retrieve_can_use_a_pinned_version(api, runtime_key, library):
    body = api.post(
        "/api/v1/runtime/skills/retrieve",
        {"query": "refund my money", "version": 2, "min_score": -1},
        key=runtime_key,
    ).json()

    assert body["policy_version"] == 2
    assert [s["slug"] for s in body["skills"]] == [DATES[0]]


def test_retrieve_without_a_task_names_the_field(api, runtime_key):
    response = api.post("/api/v1/runtime/skills/retrieve", {"k": 3}, key=runtime_key)
    bad_k = api.post("/api/v1/runtime/skills/retrieve", {"query": "x", "k": 0}, key=runtime_key)

    assert response.status_code == 422
    assert response.json()["code"] == "invalid"
    assert bad_k.status_code == 422
    assert bad_k.json()["errors"][0]["field"] == "k"


# --- Feedback -----------------------------------------------------------------------------


def _turns(project, session_id: str, n: int = 2) -> None:
    items = [
        TrajectoryIn(
            session_id=session_id,
            policy_version=1,
            agent={"name": "support-bot"},
            messages=[{"role": "user", "content": f"turn {i}: where is my order from last week?"}],
        )
        for i in range(n)
    ]
    trajectories_ingest(project=project, items=items, source="proxy")


def test_feedback_sets_reward_and_outcome_on_the_sessions_turns(api, project, runtime_key):
    _turns(project, "s-1")
    _turns(project, "s-2", n=1)

    response = api.post(
        "/api/v1/runtime/feedback",
        {"session_id": "s-1", "outcome": "success", "reward": 1.0},
        key=runtime_key,
    )

    assert response.status_code == 200
    assert response.json()["trajectories_updated"] == 2
    assert response.json()["incident_id"] is None
    s1 = Trajectory.objects.filter(session_id="s-1")
    assert {(t.outcome, t.reward) for t in s1} == {(Outcome.SUCCESS, 1.0)}
    assert Trajectory.objects.get(session_id="s-2").outcome == Outcome.UNKNOWN
    assert Incident.objects.count() == 0


def test_a_failed_session_becomes_an_incident_once(
    api, project, runtime_key, django_capture_on_commit_callbacks
):
    _turns(project, "s-9")
    failure = {
        "session_id": "s-9",
        "reward": -1,
        "failure": {
            "kind": "tool_error",
            "error": {"type": "ToolArgumentError", "message": "invalid date 'last week'"},
            "feedback": "The bot could not find my order",
        },
    }

    with django_capture_on_commit_callbacks(execute=False):
        first = api.post("/api/v1/runtime/feedback", failure, key=runtime_key)
        again = api.post("/api/v1/runtime/feedback", failure, key=runtime_key)

    assert first.status_code == 200
    assert first.json()["duplicate"] is False
    assert again.json()["duplicate"] is True
    incident = Incident.objects.get()
    assert str(incident.pk) == first.json()["incident_id"]
    assert incident.session_id == "s-9"
    assert incident.kind == "tool_error"
    assert incident.agent_name == "support-bot"
    assert incident.policy_version == 1
    assert incident.messages[0]["content"].startswith("turn")
    assert incident.feedback_text == "The bot could not find my order"
    assert set(Trajectory.objects.values_list("outcome", flat=True)) == {Outcome.FAILURE}


def test_feedback_without_an_outcome_names_the_field(api, runtime_key):
    response = api.post("/api/v1/runtime/feedback", {"session_id": "s"}, key=runtime_key)
    missing = api.post("/api/v1/runtime/feedback", {"reward": 1}, key=runtime_key)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "outcome"
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "session_id"


def test_a_long_session_id_still_becomes_an_incident(api, project, runtime_key):
    """The incident id is derived from a hash of the session id: bounded whatever its length
    (``session:`` + a 200-character id used to overflow the 200-character id and answer 500)."""
    session_id = "s" * 200
    _turns(project, session_id)

    response = api.post(
        "/api/v1/runtime/feedback",
        {"session_id": session_id, "failure": {"feedback": "wrong"}},
        key=runtime_key,
    )

    assert response.status_code == 200
    incident = Incident.objects.get()
    assert incident.session_id == session_id
    assert incident.client_id == feedback.session_incident_id(session_id)
    assert len(incident.client_id) <= 200


def test_a_session_id_that_is_not_printable_text_is_refused(api, project, runtime_key):
    for bad in ("a\x00b", "line\nbreak", "bell\x07"):
        response = api.post(
            "/api/v1/runtime/feedback", {"session_id": bad, "outcome": "success"}, key=runtime_key
        )
        assert response.status_code == 422, bad
        assert response.json()["errors"][0]["field"] == "session_id"


def test_a_failure_that_cannot_become_an_incident_is_a_422_and_changes_nothing(
    api, project, runtime_key, monkeypatch
):
    from pydantic import ValidationError

    from incidents.schemas import IncidentIn

    def refuse(payload):
        raise ValidationError.from_exception_data(
            "IncidentIn", [{"type": "missing", "loc": ("kind",), "input": payload}]
        )

    _turns(project, "s-bad")
    monkeypatch.setattr(IncidentIn, "model_validate", refuse)

    response = api.post(
        "/api/v1/runtime/feedback",
        {"session_id": "s-bad", "reward": -1, "failure": {"feedback": "no"}},
        key=runtime_key,
    )

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "failure"
    assert Incident.objects.count() == 0
    # The outcome update ran in the same transaction and was rolled back.
    assert set(Trajectory.objects.values_list("outcome", "reward")) == {(Outcome.UNKNOWN, None)}


def test_retrieval_cleans_pathological_messages_in_linear_time(api, runtime_key, library):
    """Unclosed wrapper tags and blank lines used to make the cleaning regexes quadratic
    (``"<system>" * n``: 26 s for 160 KB) on the event loop."""
    import time

    for text in ("<system>" * 25_000, "\n" * 200_000, " \n" * 100_000, "<context x>" * 20_000):
        started = time.perf_counter()
        retrieval.query_from_messages([{"role": "user", "content": text}] * 20)
        retrieval.clean_request_text(text)
        assert time.perf_counter() - started < 0.5, text[:20]

    response = api.post(
        "/api/v1/runtime/skills/retrieve",
        {"messages": [{"role": "user", "content": "<system>" * 25_000 + " refund my money"}]},
        key=runtime_key,
    )
    assert response.status_code == 200


def test_wrapper_blocks_are_still_removed_case_insensitively():
    text = (
        "<System-Reminder>always be nice</system-reminder>"
        "<context a='1'>cwd /tmp</CONTEXT>I want a refund"
        "<env>x</env> <system>never closed"
    )

    assert retrieval.clean_request_text(text) == "I want a refund <system>never closed"
