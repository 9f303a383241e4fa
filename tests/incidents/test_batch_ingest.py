"""The batch endpoint's contract, item by item, and what the database holds afterwards."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from unittest import mock

import pytest

from base.models import AuditEvent
from incidents.models import GroupStatus, Incident, IncidentGroup, SynthesisStatus
from tests import factories

pytestmark = pytest.mark.django_db

BATCH = "/api/v1/incidents/batch"


def _error(message: str, type_: str = "ToolArgumentError") -> dict:
    return {"type": type_, "message": message}


def test_a_client_id_repeated_inside_a_batch_is_stored_once_as_first_sent(api, project, ingest_key):
    items = [
        factories.incident_payload("a"),
        factories.incident_payload("b"),
        factories.incident_payload("a", kind="timeout", error=_error("other", "Timeout")),
        factories.incident_payload("a"),
    ]
    body = api.post(BATCH, {"items": items}, key=ingest_key).json()

    assert [r["status"] for r in body["results"]] == [202, 202, 200, 200]
    assert [r["duplicate"] for r in body["results"]] == [False, False, True, True]
    assert body["results"][2]["id"] == body["results"][0]["id"] == body["results"][3]["id"]
    assert body["results"][2]["group_id"] == body["results"][0]["group_id"]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 2, 0)
    stored = Incident.objects.get(client_id="a")
    assert str(stored.pk) == body["results"][0]["id"]
    assert stored.kind == "tool_error"  # the first occurrence, not a later one
    assert Incident.objects.count() == 2
    assert IncidentGroup.objects.get().event_count == 2


def test_a_batch_mixing_stored_and_new_client_ids_stores_only_the_new(api, project, ingest_key):
    first = api.post(
        BATCH,
        {"items": [factories.incident_payload("x-1"), factories.incident_payload("x-2")]},
        key=ingest_key,
    ).json()["results"]
    items = [
        factories.incident_payload("x-2"),
        factories.incident_payload("n-1"),
        factories.incident_payload("x-1", kind="timeout"),
        factories.incident_payload("n-2"),
    ]
    results = api.post(BATCH, {"items": items}, key=ingest_key).json()["results"]

    assert [r["status"] for r in results] == [200, 202, 200, 202]
    assert [r["client_id"] for r in results] == ["x-2", "n-1", "x-1", "n-2"]
    assert results[0]["id"] == first[1]["id"] and results[2]["id"] == first[0]["id"]
    assert {r["group_id"] for r in results} == {first[0]["group_id"]}
    ids = {str(pk) for pk in Incident.objects.values_list("id", flat=True)}
    assert ids == {r["id"] for r in results}
    assert IncidentGroup.objects.get().event_count == 4  # stored ones are not counted again


def test_a_batch_upserts_each_group_once_with_counts_span_severity_and_flags(
    api, project, ingest_key, django_capture_on_commit_callbacks
):
    resolved_id = api.post(
        "/api/v1/incidents",
        factories.incident_payload("r-0", error=_error("resolved: bad value 1")),
        key=ingest_key,
    ).json()["group_id"]
    proposed_id = api.post(
        "/api/v1/incidents",
        factories.incident_payload("p-0", error=_error("proposed: bad value 1")),
        key=ingest_key,
    ).json()["group_id"]
    IncidentGroup.objects.filter(pk=resolved_id).update(
        status=GroupStatus.RESOLVED, synthesis_status=SynthesisStatus.NONE
    )
    IncidentGroup.objects.filter(pk=proposed_id).update(synthesis_status=SynthesisStatus.PROPOSED)

    def at(day: int) -> str:
        return datetime(2026, 1, day, 12, 0, 0, 123456, tzinfo=UTC).isoformat()

    items = [
        factories.incident_payload(
            "r-1", error=_error("resolved: bad value 2"), severity="low", occurred_at=at(3)
        ),
        factories.incident_payload("n-1", error=_error("new: bad value 1"), occurred_at=at(5)),
        factories.incident_payload(
            "r-2", error=_error("resolved: bad value 3"), severity="critical", occurred_at=at(1)
        ),
        factories.incident_payload("p-1", error=_error("proposed: bad value 7")),
        factories.incident_payload(
            "n-2", error=_error("new: bad value 2"), severity="low", occurred_at=at(4)
        ),
        factories.incident_payload(
            "r-3", error=_error("resolved: bad value 4"), severity="medium", occurred_at=at(2)
        ),
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        results = api.post(BATCH, {"items": items}, key=ingest_key).json()["results"]

    assert [r["status"] for r in results] == [202] * 6
    new_id = results[1]["group_id"]
    assert results[4]["group_id"] == new_id
    assert {results[i]["group_id"] for i in (0, 2, 5)} == {resolved_id}
    assert results[3]["group_id"] == proposed_id

    resolved = IncidentGroup.objects.get(pk=resolved_id)
    assert resolved.event_count == 4
    assert resolved.status == GroupStatus.REGRESSED
    assert resolved.regressed_at is not None and resolved.status_changed_at is not None
    assert resolved.severity == "critical"
    assert resolved.first_seen == datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert resolved.synthesis_status == SynthesisStatus.WAITING  # was NONE: back in the queue
    assert (
        AuditEvent.objects.filter(
            action="incident_group.regressed", object_id=str(resolved_id)
        ).count()
        == 1
    )

    new = IncidentGroup.objects.get(pk=new_id)
    assert new.event_count == 2
    assert new.status == GroupStatus.UNRESOLVED
    assert new.severity == "high"
    assert new.first_seen == datetime(2026, 1, 4, 12, 0, 0, 123456, tzinfo=UTC)
    assert new.last_seen == datetime(2026, 1, 5, 12, 0, 0, 123456, tzinfo=UTC)
    assert new.synthesis_status == SynthesisStatus.WAITING
    assert new.title == "ToolArgumentError: new: bad value 1"
    assert new.normalized_message == "new: bad value <n>"

    proposed = IncidentGroup.objects.get(pk=proposed_id)
    assert proposed.event_count == 2
    assert proposed.synthesis_status == SynthesisStatus.PROPOSED  # more evidence, no re-queue
    # One announcement after commit, of the groups this batch put in the fast loop's queue.
    assert len(callbacks) == 1
    with mock.patch("skills.synthesis.tasks.propose_skill.delay") as enqueue:
        callbacks[0]()
    assert sorted(call.args[0] for call in enqueue.call_args_list) == sorted([resolved_id, new_id])

    incident = Incident.objects.get(client_id="r-2")
    assert incident.occurred_at == datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert incident.group_id == resolved_id and incident.status == "new"
    assert incident.feedback_score == 1.0 and incident.feedback_text == "It failed"
    assert incident.policy_version is None and incident.reward is None


def test_json_postgres_cannot_store_is_cleaned_inside_messages_tools_and_metadata(api, ingest_key):
    deep: object = "bottom"
    for _ in range(70):
        deep = [deep]
    dirty = factories.incident_payload(
        "dirty",
        error={"type": "ToolError", "message": "failed"},
        messages=[
            {"role": "user", "content": "find \u0000 it", "extra": "kept\u0000"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "ok\u0000", "alt\u0000": "x\ud800y", "n": float("nan")}
                ],
                "tool_calls": [
                    {
                        "id": "c\u00001",
                        "function": {"name": "look\u0000up", "arguments": {"q\u0000": "\u0000"}},
                    }
                ],
            },
        ],
        tools=[{"name": "lookup", "bad": "\ud83d", "inf": float("inf")}],
        metadata={"deep": deep},
    )
    # Nothing to clean, though the text may look so: brackets in strings, a literal "\u0000".
    clean = factories.incident_payload(
        "clean", metadata={"brackets": "[[{{" * 40}, tools=[{"text": "a \\u0000 b"}]
    )
    raw = json.dumps({"items": [dirty, clean]})  # NaN and lone surrogates, as some clients send
    body = api.post(BATCH, raw, key=ingest_key, raw=True).json()

    assert [r["status"] for r in body["results"]] == [202, 202], body
    stored = Incident.objects.get(client_id="dirty")
    assert stored.messages == [
        {"role": "user", "content": "find  it", "extra": "kept"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "ok", "alt": "x?y", "n": None}],
            "tool_calls": [{"id": "c1", "function": {"name": "lookup", "arguments": {"q": ""}}}],
        },
    ]
    assert stored.tool_name == "lookup"
    assert stored.tools == [{"name": "lookup", "bad": "?", "inf": None}]
    cut: object = None  # clean_json keeps 64 levels below the top and cuts the rest
    for _ in range(64):
        cut = [cut]
    assert stored.metadata == {"deep": cut}
    clean_stored = Incident.objects.get(client_id="clean")
    assert clean_stored.metadata == {"brackets": "[[{{" * 40}
    assert clean_stored.tools == [{"text": "a \\u0000 b"}]
    assert clean_stored.messages == clean["messages"]  # "content": null is kept, as sent


def test_an_invalid_item_gets_422_naming_nested_fields_and_the_rest_is_stored(api, ingest_key):
    bad = factories.incident_payload("bad")
    bad["messages"][1]["tool_calls"][0]["function"] = {"arguments": "{}"}
    bad["messages"][0]["role"] = "robot"
    bad["feedback"] = {"reward": 1e9}
    items = [bad, factories.incident_payload("good"), "not an object"]
    body = api.post(BATCH, {"items": items}, key=ingest_key).json()

    assert [r["status"] for r in body["results"]] == [422, 202, 422]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 0, 2)
    errors = body["results"][0]["errors"]
    assert {e["field"] for e in errors} == {
        "messages.0.role",
        "messages.1.tool_calls.0.function.name",
        "feedback.reward",
    }
    assert all(set(e) == {"field", "message", "type"} for e in errors)
    assert body["results"][0]["id"] is None and body["results"][0]["client_id"] is None
    assert body["results"][2]["errors"]
    assert list(Incident.objects.values_list("client_id", flat=True)) == ["good"]


def test_a_single_invalid_incident_keeps_the_error_body_shape(api, ingest_key):
    payload = factories.incident_payload("x")
    payload["messages"][0]["role"] = "robot"
    payload["policy_version"] = 0
    response = api.post("/api/v1/incidents", payload, key=ingest_key)

    assert response.status_code == 422
    body = response.json()
    assert body["detail"] == "Invalid input." and body["code"] == "invalid"
    assert {e["field"] for e in body["errors"]} == {"messages.0.role", "policy_version"}
    assert all(set(e) == {"field", "message", "type"} for e in body["errors"])


def test_the_api_docs_describe_the_ingestion_bodies(client):
    schema = client.get("/api/v1/openapi.json").json()
    components = schema["components"]["schemas"]
    assert {"IncidentIn", "ChatMessage", "BatchIn", "BatchOut", "BatchItemResult"} <= set(
        components
    )
    assert components["IncidentIn"]["properties"]["id"]["maxLength"] == 200
    assert client.get("/api/v1/docs").status_code == 200


def test_keys_of_a_message_beyond_the_chat_format_are_stored_as_sent(api, ingest_key):
    payload = factories.incident_payload("extras")
    payload["messages"][0]["reasoning_content"] = "The user wants last week's order."
    payload["messages"][2]["refusal"] = None

    response = api.post("/api/v1/incidents", payload, key=ingest_key)

    assert response.status_code == 202
    stored = Incident.objects.get(client_id="extras").messages
    assert stored[0] == {
        "role": "user",
        "content": "Where is my order?",
        "reasoning_content": "The user wants last week's order.",
    }
    assert stored[2]["refusal"] is None  # explicit nulls are kept as sent, declared or not
