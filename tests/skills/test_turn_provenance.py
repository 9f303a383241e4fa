"""What each turn ran with: every proxied turn keeps its policy version, the skills injected
(slug, revision, score, rank), the threshold retrieval applied and the model it was sent to;
``GET /api/v1/turns`` lists turns with filters and the Turns pages show them.

Turns go through the proxy's Django door (``/v1/chat/completions``) to our loopback upstream;
the recorder thread writes them, so these tests commit (``transaction=True``)."""

from __future__ import annotations

import json

import pytest

from base.models import Role
from incidents.models import Trajectory
from skills.runtime import admission, recording
from skills.versions.services import skill_revision_approve
from tests import factories
from tests.fakes.openai_server import OpenAIServer, Reply

pytestmark = pytest.mark.django_db(transaction=True)

REFUNDS = (
    "refund-policy",
    "Check refund eligibility",
    "When a customer asks to be reimbursed or wants their payment back for an order.",
    "Look up the order age first: orders older than 30 days are past the return window.",
)


@pytest.fixture(autouse=True)
def _recordings_finished(fresh_runtime_caches):
    yield
    recording.recordings_wait(5)


@pytest.fixture
def upstream():
    with OpenAIServer(default=Reply(content="done", usage={"prompt_tokens": 11})) as server:
        yield server


@pytest.fixture
def project(db, upstream):
    project = factories.make_project(
        upstream_base_url=upstream.base_url,
        upstream_api_key="up-key",
        upstream_model_map={"gpt-test": "real-model-b"},
    )
    # v2: dates; v3 (active): dates + refunds
    for skill in (factories.SEARCH_ORDERS_DATES, REFUNDS):
        revision = factories.make_human_revision(project, skill)
        skill_revision_approve(revision=revision, actor=None, actor_label="test")
    return project


def proxy(client, key: str, question: str, *, model: str = "gpt-test", **headers: str):
    response = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": question}]}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
        **{f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()},
    )
    assert response.status_code == 200, response.content
    return response


@pytest.fixture
def turns(client, project, runtime_key, ingest_key, api):
    """A refund turn on the active version (v3) through the model map, a date turn pinned to
    v2 under another model, and a turn reported through the API."""
    proxy(client, runtime_key, factories.REFUND_QUESTION, **{"X-Session-Id": "s-1"})
    proxy(
        client,
        runtime_key,
        factories.DATE_QUESTION,
        model="other-model",
        **{"X-MetaClaw-Policy-Version": "2", "X-Session-Id": "s-2"},
    )
    assert recording.recordings_wait(5)
    answer = api.post(
        "/api/v1/trajectories/batch",
        {"items": [{"session_id": "s-3", "messages": [{"role": "user", "content": "hi"}]}]},
        key=ingest_key,
    )
    assert answer.status_code == 207
    refund = Trajectory.objects.get(project=project, session_id="s-1")
    dates = Trajectory.objects.get(project=project, session_id="s-2")
    reported = Trajectory.objects.get(project=project, session_id="s-3")
    return refund, dates, reported


def test_a_proxied_turn_keeps_its_version_skills_with_scores_and_the_model_sent(
    turns, project, settings
):
    refund, dates, _ = turns

    assert refund.source == "proxy" and refund.policy_version == 3
    assert refund.model == "real-model-b"  # after the model map, not the name asked for
    assert refund.metadata["requested_model"] == "gpt-test"
    first = refund.skills_injected[0]
    assert first["slug"] == "refund-policy" and first["rank"] == 1
    assert first["revision"] == 1 and isinstance(first["revision_id"], int)
    assert first["score"] >= settings.METACLAW["RETRIEVAL_MIN_SCORE"]
    assert [s["rank"] for s in refund.skills_injected] == list(
        range(1, len(refund.skills_injected) + 1)
    )
    assert refund.metadata["retrieval"] == {
        "query": factories.REFUND_QUESTION,
        "min_score": settings.METACLAW["RETRIEVAL_MIN_SCORE"],
        "margin": settings.METACLAW["RETRIEVAL_MARGIN"],
    }
    assert dates.policy_version == 2 and dates.model == "other-model"
    assert [s["slug"] for s in dates.skills_injected] == ["search-orders-dates"]


def test_the_api_lists_turns_with_filters(api, turns, ingest_key):
    refund, dates, reported = turns

    def ids(**params) -> list[str]:
        response = api.get("/api/v1/turns", key=ingest_key, **params)
        assert response.status_code == 200, response.content
        return [item["id"] for item in response.json()["items"]]

    assert ids() == [str(reported.id), str(dates.id), str(refund.id)]  # newest first
    assert ids(source="proxy") == [str(dates.id), str(refund.id)]
    assert ids(source="api") == [str(reported.id)]
    assert ids(skill="refund-policy") == [str(refund.id)]
    assert str(dates.id) in ids(skill="search-orders-dates")
    assert ids(skill="no-such-skill") == []
    assert ids(model="real-model-b") == [str(refund.id)]
    assert ids(policy_version=2) == [str(dates.id)]
    assert ids(session_id="s-2") == [str(dates.id)]
    assert ids(status=200) == [str(dates.id), str(refund.id)]
    assert ids(status=502) == []
    assert ids(since=dates.occurred_at.isoformat()) == [str(reported.id), str(dates.id)]
    assert ids(until=dates.occurred_at.isoformat()) == [str(refund.id)]

    first = api.get("/api/v1/turns", key=ingest_key, limit=2).json()
    second = api.get("/api/v1/turns", key=ingest_key, limit=2, cursor=first["next_cursor"]).json()
    assert [i["id"] for i in first["items"] + second["items"]] == ids()
    assert second["next_cursor"] is None
    assert api.get("/api/v1/turns", key=ingest_key, limit=0).status_code == 422


def test_the_api_shows_one_turn_with_what_it_ran_with(api, turns, ingest_key, settings):
    refund, _, reported = turns

    body = api.get(f"/api/v1/turns/{refund.id}", key=ingest_key).json()

    assert body["policy_version"] == 3
    assert body["model"] == "real-model-b" and body["requested_model"] == "gpt-test"
    assert body["skills_injected"][0]["slug"] == "refund-policy"
    assert body["skills_injected"][0]["score"] == refund.skills_injected[0]["score"]
    assert body["skills_injected"][0]["rank"] == 1
    assert body["min_score"] == settings.METACLAW["RETRIEVAL_MIN_SCORE"]
    assert body["retrieval_query"] == factories.REFUND_QUESTION
    assert body["status_code"] == 200 and body["prompt_tokens"] == 11
    api_turn = api.get(f"/api/v1/turns/{reported.id}", key=ingest_key).json()
    assert api_turn["source"] == "api" and api_turn["skills_injected"] == []
    assert api_turn["min_score"] is None


def test_turns_are_read_with_a_ingest_key_of_their_own_project_only(
    api, turns, runtime_key, other_project
):
    refund, _, _ = turns
    other_key = factories.make_key(other_project, scopes=["ingest"])

    assert api.get("/api/v1/turns", key=runtime_key).status_code == 403
    assert api.get("/api/v1/turns").status_code == 401
    assert api.get("/api/v1/turns", key=other_key).json()["items"] == []
    assert api.get(f"/api/v1/turns/{refund.id}", key=other_key).status_code == 404


def test_the_turn_pages_show_the_injected_skills_with_scores_and_the_threshold(
    client, project, turns, settings
):
    refund, dates, _ = turns
    # An admin: the query is shown unmasked (a viewer's masks personal data, as group pages do,
    # and loading that detector would cost this test seconds).
    client.force_login(factories.make_member(project, Role.ADMIN))

    page = client.get(f"/p/{project.slug}/turns/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f'href="/p/{project.slug}/turns/"' in html  # the nav links here
    assert f"{refund.id}/" in html and f"{dates.id}/" in html
    assert "refund-policy" in html and "real-model-b" in html

    filtered = client.get(f"/p/{project.slug}/turns/?skill=refund-policy", HTTP_HX_REQUEST="true")
    assert str(refund.id) in filtered.content.decode()
    assert str(dates.id) not in filtered.content.decode()
    assert "<html" not in filtered.content.decode()  # the table partial only

    detail = client.get(f"/p/{project.slug}/turns/{refund.id}/")
    assert detail.status_code == 200
    html = detail.content.decode()
    score = refund.skills_injected[0]["score"]
    assert "refund-policy" in html and f"{score:.3f}" in html
    assert f"Retrieval threshold: <strong>{settings.METACLAW['RETRIEVAL_MIN_SCORE']}" in html
    assert "v3" in html and "gpt-test" in html
    assert factories.REFUND_QUESTION.split(",")[0] in html  # what retrieval looked at


def test_another_projects_turn_page_is_404(client, project, turns, other_project):
    refund, _, _ = turns
    client.force_login(factories.make_member(other_project, Role.ADMIN))

    assert client.get(f"/p/{other_project.slug}/turns/{refund.id}/").status_code == 404
    assert str(refund.id) not in client.get(f"/p/{other_project.slug}/turns/").content.decode()


def test_a_failed_upstream_turn_is_recorded_with_its_status(
    client, project, runtime_key, api, settings
):
    settings.UPSTREAM = {"BASE_URL": "", "API_KEY": ""}
    project.upstream_base_url = ""
    project.save(update_fields=["upstream_base_url"])
    admission.runtime_key_cache_clear()
    ingest_key = factories.make_key(project, scopes=["admin"])

    response = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {runtime_key}",
    )
    assert recording.recordings_wait(5)

    turns = api.get("/api/v1/turns", key=ingest_key, status=response.status_code).json()["items"]
    assert [t["status_code"] for t in turns] == [response.status_code]
    assert turns[0]["policy_version"] == 3
