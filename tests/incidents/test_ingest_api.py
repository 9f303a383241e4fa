from __future__ import annotations

import json

import pytest

from base.models import AuditEvent
from incidents.models import GroupStatus, Incident, IncidentGroup, SynthesisStatus, Trajectory
from tests import factories

pytestmark = pytest.mark.django_db


def test_post_incident_stores_it_grouped_and_answers_202(api, project, ingest_key):
    response = api.post("/api/v1/incidents", factories.incident_payload("c-1"), key=ingest_key)

    assert response.status_code == 202
    body = response.json()
    incident = Incident.objects.get(pk=body["id"])
    assert incident.project == project
    assert incident.client_id == "c-1"
    assert incident.tool_name == "search_orders"
    assert body["group_id"] == incident.group_id
    group = incident.group
    assert group.event_count == 1
    assert group.title.startswith("ToolArgumentError: search_orders")
    assert group.synthesis_status == SynthesisStatus.WAITING


def test_same_client_id_again_answers_200_with_the_stored_incident(api, project, ingest_key):
    first = api.post("/api/v1/incidents", factories.incident_payload("dup"), key=ingest_key).json()
    again = api.post(
        "/api/v1/incidents",
        factories.incident_payload("dup", kind="timeout", error={"message": "other"}),
        key=ingest_key,
    )

    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["duplicate"] is True
    assert Incident.objects.count() == 1
    assert IncidentGroup.objects.get().event_count == 1


def test_incidents_differing_only_in_ids_and_values_share_a_group(api, project, ingest_key):
    for i, (value, request) in enumerate([("last week", 4411), ("03/11/2026", 12), ("yday", 9)]):
        payload = factories.incident_payload(
            f"n-{i}",
            error={
                "type": "ToolArgumentError",
                "message": f"search_orders: invalid value '{value}' for 'since' (request {request})",
            },
        )
        assert api.post("/api/v1/incidents", payload, key=ingest_key).status_code == 202
    other = factories.incident_payload("n-x", kind="timeout")
    api.post("/api/v1/incidents", other, key=ingest_key)

    groups = IncidentGroup.objects.order_by("-event_count")
    assert [g.event_count for g in groups] == [3, 1]


def test_a_new_incident_in_a_resolved_group_marks_it_regressed(api, project, ingest_key):
    api.post("/api/v1/incidents", factories.incident_payload("r-1"), key=ingest_key)
    IncidentGroup.objects.update(status=GroupStatus.RESOLVED)

    api.post("/api/v1/incidents", factories.incident_payload("r-2"), key=ingest_key)

    group = IncidentGroup.objects.get()
    assert group.status == GroupStatus.REGRESSED
    assert group.regressed_at is not None
    assert (
        AuditEvent.objects.filter(
            action="incident_group.regressed", object_id=str(group.pk)
        ).count()
        == 1
    )


def test_invalid_incident_answers_422_naming_each_bad_field(api, ingest_key):
    payload = factories.incident_payload(kind="explosion", severity="huge")
    del payload["agent"]
    response = api.post("/api/v1/incidents", payload, key=ingest_key)

    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert {"agent", "kind", "severity"} <= fields
    assert Incident.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[]",
        "null",
        '"text"',
        '{"id": 5}',
        json.dumps(factories.incident_payload(feedback={"score": "NaN"})),
        '{"id": "x", "agent": {"name": "a"}, "kind": "other", "feedback": {"score": NaN}}',
        "[" * 5000 + "]" * 5000,
    ],
)
def test_malformed_bodies_get_a_4xx_never_a_500(api, ingest_key, body):
    response = api.post("/api/v1/incidents", body, key=ingest_key, raw=True)
    assert 400 <= response.status_code < 500, response.content
    assert response["Content-Type"].startswith("application/json")
    assert Incident.objects.count() == 0


def test_text_postgres_cannot_store_is_cleaned_not_a_500(api, ingest_key):
    payload = factories.incident_payload(
        "nul\u0000id".replace("\u0000", ""),
        error={"type": "X\u0000", "message": "bad NUL \u0000"},
        metadata={"nan": float("nan"), "nested": {"k\u0000": ["v\u0000"]}},
    )
    raw = json.dumps(payload)  # json.dumps writes NaN, as some clients do
    response = api.post("/api/v1/incidents", raw, key=ingest_key, raw=True)

    assert response.status_code == 202, response.content
    incident = Incident.objects.get()
    assert "\x00" not in incident.error_message
    assert incident.metadata == {"nan": None, "nested": {"k": ["v"]}}


def test_a_lone_surrogate_is_refused_with_the_field_named(api, ingest_key):
    payload = factories.incident_payload(error={"type": "X", "message": "bad \ud800 text"})
    response = api.post("/api/v1/incidents", json.dumps(payload), key=ingest_key, raw=True)

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "error.message"


def test_batch_stores_good_items_and_reports_each(api, project, ingest_key):
    api.post("/api/v1/incidents", factories.incident_payload("old"), key=ingest_key)
    items = [
        factories.incident_payload("b-1"),
        {"id": "b-2", "kind": "nope"},
        factories.incident_payload("old"),
        factories.incident_payload("b-1"),
        factories.incident_payload("b-3", kind="timeout"),
    ]
    response = api.post("/api/v1/incidents/batch", {"items": items}, key=ingest_key)

    assert response.status_code == 207
    body = response.json()
    assert [r["status"] for r in body["results"]] == [202, 422, 200, 200, 202]
    assert body["accepted"] == 2 and body["duplicates"] == 2 and body["rejected"] == 1
    assert {e["field"] for e in body["results"][1]["errors"]} >= {"agent", "kind"}
    assert body["results"][3]["id"] == body["results"][0]["id"]
    assert set(Incident.objects.values_list("client_id", flat=True)) == {"old", "b-1", "b-3"}
    assert sum(IncidentGroup.objects.values_list("event_count", flat=True)) == 3


def test_batch_over_the_item_limit_is_refused_whole(api, ingest_key, settings):
    settings.METACLAW = {**settings.METACLAW, "BATCH_MAX_ITEMS": 3}
    items = [factories.incident_payload(f"m-{i}") for i in range(4)]
    response = api.post("/api/v1/incidents/batch", {"items": items}, key=ingest_key)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "items"
    assert Incident.objects.count() == 0


def test_body_over_the_size_limit_answers_413(api, ingest_key, settings):
    settings.METACLAW = {**settings.METACLAW, "BATCH_MAX_BODY_BYTES": 10_000}
    items = [factories.incident_payload(f"s-{i}", metadata={"pad": "x" * 3000}) for i in range(5)]
    response = api.post("/api/v1/incidents/batch", {"items": items}, key=ingest_key)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert Incident.objects.count() == 0


def test_trajectories_batch_stores_turns_idempotently(api, project, ingest_key):
    items = [
        {
            "id": "t-1",
            "session_id": "s-1",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ],
            "reward": 1.0,
            "outcome": "success",
            "policy_version": 1,
        },
        {"id": "t-2", "messages": []},
    ]
    first = api.post("/api/v1/trajectories/batch", {"items": items}, key=ingest_key).json()
    second = api.post("/api/v1/trajectories/batch", {"items": items[:1]}, key=ingest_key).json()

    assert [r["status"] for r in first["results"]] == [202, 422]
    assert second["results"][0]["status"] == 200
    assert second["results"][0]["id"] == first["results"][0]["id"]
    trajectory = Trajectory.objects.get()
    assert (trajectory.session_id, trajectory.reward, trajectory.policy_version) == ("s-1", 1.0, 1)


def test_a_trajectory_id_with_a_nul_is_refused_per_item(api, ingest_key):
    items = [{"id": "t\u0000x", "messages": [{"role": "user", "content": "hi"}]}]
    body = api.post("/api/v1/trajectories/batch", {"items": items}, key=ingest_key).json()
    assert body["results"][0]["status"] == 422
    assert body["results"][0]["errors"][0]["field"] == "id"
    assert Trajectory.objects.count() == 0
