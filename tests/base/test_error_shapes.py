"""Issue 21, items 1 and 2: what schemathesis found, each case pinned through the public API on
both doors (Django's, through the test client; the ASGI fast lane, through the production
application), and the OpenAPI document telling the truth about errors and constraints."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest
from asgiref.sync import async_to_sync
from pydantic import BaseModel

from incidents.models import Incident, Trajectory
from metaclaw_site.api import api as ninja_api
from skills.library.models import SkillRevision
from tests import factories

FAR_OFFSET = "2026-03-01T10:00:00+20:00"  # PostgreSQL takes offsets up to ±15:59
FAR_OFFSET_IN_UTC = datetime(2026, 2, 28, 14, 0, tzinfo=UTC)
ERROR_STATUSES = {"400", "401", "403", "404", "409", "413", "422", "429", "500", "503"}


def fast_lane_post(path: str, body: dict, key: str) -> httpx.Response:
    """POST through the production ASGI application (ingestion is on its fast lane)."""
    from metaclaw_site.asgi import application

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            return await http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})

    return async_to_sync(send)()


def assert_error_shape(response, status: int) -> dict:
    assert response.status_code == status
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and isinstance(body["code"], str)
    return body


# --- Item 1: timestamps with offsets PostgreSQL refuses -----------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/v1/incidents", "/api/v1/groups"])
def test_a_far_utc_offset_in_since_and_until_filters_as_the_same_instant(
    api, project, ingest_key, path
):
    api.post("/api/v1/incidents", factories.incident_payload("i-1"), key=ingest_key)

    before = api.get(path, key=ingest_key, since="2000-01-01T00:00:00+20:00", until=FAR_OFFSET)
    after = api.get(path, key=ingest_key, since=FAR_OFFSET)

    assert before.status_code == 200 and before.json()["items"] == []
    assert after.status_code == 200 and len(after.json()["items"]) == 1


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["-1141", "1700000000", "yesterday", "2024-01-01T12:99:00Z"])
def test_a_timestamp_that_is_not_rfc_3339_is_refused(api, project, ingest_key, value):
    response = api.get("/api/v1/incidents", key=ingest_key, until=value)

    body = assert_error_shape(response, 422)
    assert body["errors"][0]["field"] == "until"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("door", ["django", "fast lane"])
def test_an_incident_with_a_far_offset_is_stored_at_the_same_instant_in_utc(
    api, project, ingest_key, door
):
    payload = factories.incident_payload("far-1", occurred_at=FAR_OFFSET)

    if door == "django":
        response = api.post("/api/v1/incidents", payload, key=ingest_key)
    else:
        response = fast_lane_post("/api/v1/incidents", payload, ingest_key)

    assert response.status_code == 202
    assert Incident.objects.get(client_id="far-1").occurred_at == FAR_OFFSET_IN_UTC


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("door", ["django", "fast lane"])
def test_a_batch_with_a_far_offset_stores_every_good_item(api, project, ingest_key, door):
    items = [
        factories.incident_payload("far-2", occurred_at=FAR_OFFSET),
        factories.incident_payload("bad", occurred_at="not a time"),
        factories.incident_payload("near", occurred_at="2026-03-01T10:00:00+02:00"),
    ]

    if door == "django":
        response = api.post("/api/v1/incidents/batch", {"items": items}, key=ingest_key)
    else:
        response = fast_lane_post("/api/v1/incidents/batch", {"items": items}, ingest_key)

    assert response.status_code == 207
    assert [r["status"] for r in response.json()["results"]] == [202, 422, 202]
    assert set(Incident.objects.values_list("client_id", flat=True)) == {"far-2", "near"}


@pytest.mark.django_db(transaction=True)
def test_a_trajectory_with_a_far_offset_is_stored_in_utc(project, ingest_key):
    turn = {"messages": [{"role": "user", "content": "hi"}], "occurred_at": FAR_OFFSET}

    response = fast_lane_post("/api/v1/trajectories/batch", {"items": [turn]}, ingest_key)

    assert response.status_code == 207 and response.json()["accepted"] == 1
    assert Trajectory.objects.get().occurred_at == FAR_OFFSET_IN_UTC


# --- Item 1: NUL in a decision's reason ----------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["reject", "approve"])
def test_a_nul_in_a_decisions_reason_is_dropped(api, project, admin_key, action):
    revision = factories.make_revision(project)

    response = api.post(
        f"/api/v1/skills/revisions/{revision.pk}/{action}",
        {"reason": "dup\x00licate"},
        key=admin_key,
    )

    assert response.status_code == 200
    assert SkillRevision.objects.get(pk=revision.pk).decision_reason == "duplicate"


# --- Item 1: every error in the one shape, never Django's HTML -----------------------------------


@pytest.mark.django_db
def test_an_unexpected_error_is_a_json_500(client, project, ingest_key, monkeypatch):
    from incidents import selectors

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(selectors, "incidents_for_project", broken)
    client.raise_request_exception = False

    response = client.get("/api/v1/incidents", headers={"Authorization": f"Bearer {ingest_key}"})

    assert assert_error_shape(response, 500)["code"] == "internal_error"


@pytest.mark.django_db
def test_an_unknown_route_and_a_wrong_method_are_json(client):
    missing = client.get("/api/v1/no-such-thing")
    wrong_method = client.delete("/api/v1/incidents")

    assert assert_error_shape(missing, 404)["code"] == "not_found"
    assert assert_error_shape(wrong_method, 405)["code"] == "method_not_allowed"
    assert "POST" in wrong_method["Allow"]


# --- Item 2: the schema says what is refused, and refuses what it says ---------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("body", ["false", "[null, null]", "3"])
def test_a_body_that_is_not_an_object_is_refused(api, project, admin_key, body):
    response = api.post("/api/v1/versions", body, key=admin_key, raw=True)

    assert assert_error_shape(response, 422)["errors"][0]["field"] == "body"


@pytest.mark.django_db(transaction=True)
def test_a_body_that_is_not_an_object_is_refused_on_the_fast_lane(project, ingest_key):
    response = fast_lane_post("/api/v1/incidents", [factories.incident_payload()], ingest_key)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"
    assert not Incident.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/runtime/feedback", {"session_id": "s", "failure": [None, None]}),
        ("/api/v1/runtime/feedback", {"session_id": "s", "reward": False}),
        ("/api/v1/incidents", factories.incident_payload("r", reward=False)),
        ("/api/v1/incidents", factories.incident_payload("r", policy_version="3")),
    ],
)
def test_values_the_schema_calls_invalid_are_refused(api, project, admin_key, path, body):
    response = api.post(path, body, key=admin_key)

    assert assert_error_shape(response, 422)["errors"]
    assert not Incident.objects.exists()


@pytest.mark.django_db
def test_an_id_of_printable_text_the_schema_allows_is_accepted(api, project, ingest_key):
    # Zero-width and other format characters are text; control characters are not.
    accepted = api.post("/api/v1/incidents", factories.incident_payload("a\u200bb"), key=ingest_key)
    refused = api.post("/api/v1/incidents", factories.incident_payload("a\nb"), key=ingest_key)

    assert accepted.status_code == 202
    assert assert_error_shape(refused, 422)["errors"][0]["field"] == "id"


def test_every_operation_declares_its_errors_in_the_one_shape():
    document = ninja_api.get_openapi_schema(path_prefix="/api/v1")
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}

    assert document["components"]["schemas"]["Error"]["required"] == ["detail", "code"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            declared = {status for status in operation["responses"] if status in ERROR_STATUSES}
            assert declared == ERROR_STATUSES, (method, path)
            # An operation that documents an error status itself keeps its own description.
            assert operation["responses"]["401"]["content"] == error
            assert operation["responses"]["500"]["content"] == error


def test_each_status_is_declared_once_so_that_swagger_ui_reads_the_document():
    # ninja keys an operation's own statuses by int; an added "404" beside a 404 would be a
    # duplicated key in the JSON, which Swagger UI refuses to render.
    document = json.loads(json.dumps(ninja_api.get_openapi_schema(path_prefix="/api/v1")))
    text = json.dumps(ninja_api.get_openapi_schema(path_prefix="/api/v1"))

    assert len(text) == len(json.dumps(document))


def test_the_schema_carries_the_constraints():
    document = ninja_api.get_openapi_schema(path_prefix="/api/v1")
    schemas = document["components"]["schemas"]
    since = next(
        p
        for p in document["paths"]["/api/v1/incidents"]["get"]["parameters"]
        if p["name"] == "since"
    )

    assert {"type": "string", "format": "date-time"} in since["schema"]["anyOf"]
    assert schemas["IncidentIn"]["properties"]["id"]["pattern"].startswith("^[^\\x00-\\x1f")
    assert schemas["IncidentIn"]["properties"]["occurred_at"]["anyOf"][0]["format"] == "date-time"


def test_no_two_schemas_share_a_name_in_the_document():
    # Two models of one name become one component: one operation then documents the other's
    # body (IncidentIn.feedback read as the runtime's session feedback).
    names = set(ninja_api.get_openapi_schema(path_prefix="/api/v1")["components"]["schemas"])
    ours = ("base.", "incidents.", "skills.", "training.", "metaclaw_site.")
    models: dict[str, set[str]] = {}
    stack = list(BaseModel.__subclasses__())
    while stack:
        model = stack.pop()
        stack.extend(model.__subclasses__())
        if model.__module__.startswith(ours) and model.__name__ in names:
            models.setdefault(model.__name__, set()).add(model.__module__)

    shared = {name: modules for name, modules in models.items() if len(modules) > 1}
    assert not shared, shared
