from __future__ import annotations

import pytest

from base.models import AuditEvent
from incidents.models import GroupStatus, Incident, IncidentGroup
from tests import factories

pytestmark = pytest.mark.django_db


def _ingest(api, key, n, **overrides):
    items = [factories.incident_payload(f"r-{i}", **overrides) for i in range(n)]
    response = api.post("/api/v1/incidents/batch", {"items": items}, key=key)
    assert response.status_code == 207
    return response.json()


def test_list_incidents_pages_with_a_cursor_without_gaps_or_repeats(api, ingest_key):
    _ingest(api, ingest_key, 7)
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = api.get("/api/v1/incidents", key=ingest_key, **params).json()
        seen += [item["client_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"r-{i}" for i in range(7))
    assert len(seen) == len(set(seen))


def test_list_filters_by_kind_and_agent(api, ingest_key):
    _ingest(api, ingest_key, 2)
    api.post(
        "/api/v1/incidents",
        factories.incident_payload("t-1", kind="timeout", agent={"name": "analyst"}),
        key=ingest_key,
    )
    body = api.get("/api/v1/incidents", key=ingest_key, kind="timeout").json()
    assert [i["client_id"] for i in body["items"]] == ["t-1"]
    body = api.get("/api/v1/groups", key=ingest_key, agent="analyst").json()
    assert [g["agent_name"] for g in body["items"]] == ["analyst"]


def test_bad_cursor_and_limit_are_422_naming_the_field(api, ingest_key):
    response = api.get("/api/v1/incidents", key=ingest_key, cursor="garbage!!")
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "cursor"
    response = api.get("/api/v1/incidents", key=ingest_key, limit=0)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "limit"


def test_get_one_incident_and_group(api, ingest_key):
    stored = api.post("/api/v1/incidents", factories.incident_payload("one"), key=ingest_key).json()
    incident = api.get(f"/api/v1/incidents/{stored['id']}", key=ingest_key).json()
    assert incident["client_id"] == "one"
    assert incident["messages"][1]["tool_calls"][0]["function"]["name"] == "search_orders"
    group = api.get(f"/api/v1/groups/{stored['group_id']}", key=ingest_key).json()
    assert group["event_count"] == 1


def test_a_key_never_sees_another_projects_incidents(api, project, other_project, ingest_key):
    other_key = factories.make_key(other_project, scopes=["ingest"])
    stored = api.post(
        "/api/v1/incidents", factories.incident_payload("mine"), key=ingest_key
    ).json()

    assert api.get(f"/api/v1/incidents/{stored['id']}", key=other_key).status_code == 404
    assert api.get(f"/api/v1/groups/{stored['group_id']}", key=other_key).status_code == 404
    assert api.get("/api/v1/incidents", key=other_key).json()["items"] == []
    # The same client id in another project is another incident.
    again = api.post("/api/v1/incidents", factories.incident_payload("mine"), key=other_key)
    assert again.status_code == 202
    assert Incident.objects.count() == 2


def test_group_status_needs_an_admin_key_and_is_audited(api, project, ingest_key, admin_key):
    stored = api.post("/api/v1/incidents", factories.incident_payload("g"), key=ingest_key).json()
    url = f"/api/v1/groups/{stored['group_id']}/status"

    assert api.post(url, {"status": "resolved"}, key=ingest_key).status_code == 403
    response = api.post(url, {"status": "resolved"}, key=admin_key)
    assert response.status_code == 200
    assert IncidentGroup.objects.get().status == GroupStatus.RESOLVED
    assert Incident.objects.get().status == "resolved"
    event = AuditEvent.objects.get(action="incident_group.resolved")
    assert event.actor_label.startswith("api-key:")
    # Resolving twice is a conflict and changes nothing.
    assert api.post(url, {"status": "resolved"}, key=admin_key).status_code == 409
    assert AuditEvent.objects.filter(action="incident_group.resolved").count() == 1


def test_openapi_schema_lists_the_ingestion_endpoints(client):
    schema = client.get("/api/v1/openapi.json").json()
    assert {"/api/v1/incidents", "/api/v1/incidents/batch", "/api/v1/trajectories/batch"} <= set(
        schema["paths"]
    )
