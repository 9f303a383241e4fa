"""Intake takes the shapes agents already emit (issue 15, items 1 and 8): string errors,
logging levels, kind aliases, top-level task / reward / outcome, unknown fields kept in
metadata and reported, and stored messages keeping every key as sent."""

from __future__ import annotations

import json

import pytest

from incidents.models import Incident, IncidentGroup, IncidentKind, Trajectory
from tests import factories
from tests.incidents.test_fast_lane import fast

pytestmark = pytest.mark.django_db

SINGLE = "/api/v1/incidents"
BATCH = "/api/v1/incidents/batch"
TRAJECTORIES = "/api/v1/trajectories/batch"


def _fields(response) -> set[str]:
    return {e["field"] for e in response.json()["errors"]}


# --- error


def _stored_as(api, ingest_key, field: str, sent) -> set:
    """Report one incident with ``field`` set to ``sent``: the values its row and its group's
    row hold for ``field``."""
    response = api.post(SINGLE, factories.incident_payload("sent", **{field: sent}), key=ingest_key)
    assert response.status_code == 202, response.content
    incident = Incident.objects.get(client_id="sent")
    return {getattr(incident, field), getattr(IncidentGroup.objects.get(), field)}


def test_a_string_error_is_stored_as_its_message(api, ingest_key):
    payload = factories.incident_payload("s-1", error="search_orders: invalid value 'x'")

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 202, response.content
    incident = Incident.objects.get(client_id="s-1")
    assert incident.error_message == "search_orders: invalid value 'x'"
    assert incident.error_type == ""
    assert incident.tool_name == "search_orders"  # from the messages, as for an object
    assert incident.group.title == "search_orders: invalid value 'x'"


def test_a_null_error_is_no_error(api, ingest_key):
    payload = factories.incident_payload("s-2", kind="wrong_answer", error=None)

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 202, response.content
    incident = Incident.objects.get(client_id="s-2")
    assert (incident.error_type, incident.error_message) == ("", "")


def test_a_string_error_over_the_message_limit_is_refused_naming_it(api, ingest_key):
    payload = factories.incident_payload("s-3", error="x" * 20_001)

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 422
    assert _fields(response) == {"error.message"}
    assert not Incident.objects.exists()


# --- task, reward, outcome


def test_top_level_task_reward_and_outcomes_are_stored_and_read_back(api, project, ingest_key):
    outcome = {"orders": [{"id": 7, "status": "cancelled"}], "refund": None, "a": 1}
    payload = factories.incident_payload(
        "t-1",
        kind="wrong_state",
        task="Cancel order #7 and refund it.",
        reward=0.0,
        outcome=outcome,
        expected_outcome=["refund issued", {"z": 1, "b": 2}],
        feedback=None,
    )

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 202, response.content
    assert response.json()["warnings"] == []
    incident = Incident.objects.get(client_id="t-1")
    assert incident.task == "Cancel order #7 and refund it."
    assert incident.reward == 0.0
    # JSON is kept as compact text, keys in the order sent.
    assert incident.outcome == ('{"orders":[{"id":7,"status":"cancelled"}],"refund":null,"a":1}')
    assert json.loads(incident.outcome) == outcome
    assert incident.expected_outcome == '["refund issued",{"z":1,"b":2}]'
    assert "task" not in incident.metadata and "reward" not in incident.metadata

    read_key = factories.make_key(project, scopes=["admin"])
    body = api.get(f"/api/v1/incidents/{incident.pk}", key=read_key).json()
    assert body["task"] == incident.task
    assert body["outcome"] == incident.outcome
    assert body["expected_outcome"] == incident.expected_outcome
    assert body["reward"] == 0.0


def test_text_outcomes_are_stored_as_sent_and_null_as_empty(api, ingest_key):
    payload = factories.incident_payload(
        "t-2", outcome="The order is still open.", expected_outcome=None, task=None
    )

    assert api.post(SINGLE, payload, key=ingest_key).status_code == 202
    incident = Incident.objects.get(client_id="t-2")
    assert (incident.outcome, incident.expected_outcome, incident.task) == (
        "The order is still open.",
        "",
        "",
    )


def test_a_task_over_its_limit_is_refused_naming_it(api, ingest_key):
    response = api.post(SINGLE, factories.incident_payload(task="x" * 50_001), key=ingest_key)

    assert response.status_code == 422
    assert _fields(response) == {"task"}
    assert not Incident.objects.exists()


def test_feedback_reward_alone_is_still_the_incidents_reward(api, ingest_key):
    payload = factories.incident_payload("r-1", feedback={"text": "bad", "reward": -1})

    assert api.post(SINGLE, payload, key=ingest_key).status_code == 202
    assert Incident.objects.get(client_id="r-1").reward == -1.0


def test_a_top_level_reward_agreeing_with_feedback_reward_is_accepted(api, ingest_key):
    payload = factories.incident_payload("r-2", reward=0.5, feedback={"reward": 0.5})

    assert api.post(SINGLE, payload, key=ingest_key).status_code == 202
    assert Incident.objects.get(client_id="r-2").reward == 0.5


def test_a_top_level_reward_differing_from_feedback_reward_is_refused_naming_reward(
    api, ingest_key
):
    payload = factories.incident_payload("r-3", reward=1, feedback={"reward": 0})

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 422
    assert _fields(response) == {"reward"}
    assert "feedback.reward" in response.json()["errors"][0]["message"]
    assert not Incident.objects.exists()


def test_a_top_level_reward_out_of_bounds_is_refused(api, ingest_key):
    response = api.post(SINGLE, factories.incident_payload(reward=1e9), key=ingest_key)

    assert response.status_code == 422
    assert _fields(response) == {"reward"}


# --- severity and kind


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("low", "low"),
        ("high", "high"),
        ("trace", "low"),
        ("DEBUG", "low"),
        ("info", "low"),
        ("INFO", "low"),
        ("notice", "low"),
        ("log", "low"),
        ("warning", "medium"),
        ("WARNING", "medium"),
        ("warn", "medium"),
        ("Error", "high"),
        ("error", "high"),
        ("ERROR2", "high"),
        ("critical", "critical"),
        ("CRITICAL", "critical"),
        ("fatal", "critical"),
        ("alert", "critical"),
        ("emergency", "critical"),
    ],
)
def test_logging_levels_map_onto_the_severity_scale(api, ingest_key, sent, stored):
    assert _stored_as(api, ingest_key, "severity", sent) == {stored}


@pytest.mark.parametrize("sent", ["huge", "", 40])
def test_an_unknown_severity_is_refused_naming_it(api, ingest_key, sent):
    response = api.post(SINGLE, factories.incident_payload(severity=sent), key=ingest_key)

    assert response.status_code == 422
    assert _fields(response) == {"severity"}
    assert not Incident.objects.exists()


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        *[(kind, kind) for kind in IncidentKind.values],
        ("wrong_final_state", "wrong_state"),
        ("final_state", "wrong_state"),
        ("state_mismatch", "wrong_state"),
        ("Wrong-Final-State", "wrong_state"),
        ("policy", "policy_violation"),
        ("rule_violation", "policy_violation"),
        ("Policy Violation", "policy_violation"),
        ("giving_up", "gave_up"),
        ("abandoned", "gave_up"),
        ("incomplete", "gave_up"),
        ("timed_out", "timeout"),
        ("exception", "tool_error"),
        ("tool_failure", "tool_error"),
        ("TOOL_ERROR", "tool_error"),
        ("complaint", "user_complaint"),
        ("incorrect", "wrong_answer"),
        ("incorrect_answer", "wrong_answer"),
    ],
)
def test_failure_kinds_and_their_common_names_are_accepted(api, ingest_key, sent, stored):
    assert _stored_as(api, ingest_key, "kind", sent) == {stored}


def test_an_unknown_kind_is_refused_naming_it(api, ingest_key):
    response = api.post(SINGLE, factories.incident_payload(kind="explosion"), key=ingest_key)

    assert response.status_code == 422
    assert _fields(response) == {"kind"}
    assert "policy_violation" in response.json()["errors"][0]["message"]


# --- unknown top-level fields


def test_unknown_top_level_fields_are_kept_in_metadata_and_reported(api, ingest_key):
    payload = factories.incident_payload(
        "u-1",
        trace_id="4bf92f3577b34da6",
        tags={"env": "prod"},
        region="eu",  # metadata holds the same value already: nothing to refuse
        user_id=None,
    )

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 202, response.content
    warnings = response.json()["warnings"]
    assert [w["field"] for w in warnings] == ["trace_id", "tags", "region", "user_id"]
    assert {w["type"] for w in warnings} == {"moved_to_metadata"}
    assert all("metadata" in w["message"] for w in warnings)
    assert Incident.objects.get(client_id="u-1").metadata == {
        "region": "eu",
        "trace_id": "4bf92f3577b34da6",
        "tags": {"env": "prod"},
        "user_id": None,
    }


def test_a_repeated_client_id_reports_the_same_warnings(api, ingest_key):
    payload = factories.incident_payload("u-2", trace_id="t")
    first = api.post(SINGLE, payload, key=ingest_key).json()

    again = api.post(SINGLE, payload, key=ingest_key)

    assert again.status_code == 200
    assert again.json()["warnings"] == first["warnings"] != []


def test_an_unknown_field_that_metadata_holds_with_another_value_is_refused_naming_it(
    api, ingest_key
):
    payload = factories.incident_payload("u-3", region="us", trace_id="t")  # metadata: eu

    response = api.post(SINGLE, payload, key=ingest_key)

    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [(e["field"], e["type"]) for e in errors] == [("region", "metadata_conflict")]
    assert "region" in errors[0]["message"]
    assert not Incident.objects.exists()


def test_the_batch_route_reads_each_shape_and_reports_per_item(api, ingest_key):
    items = [
        factories.incident_payload(
            "b-1", error="boom", severity="WARNING", kind="exception", trace_id="t-1"
        ),
        factories.incident_payload("b-2", reward=1.0, task="Refund order 7."),
        factories.incident_payload("b-3", region="us"),  # metadata says eu
        factories.incident_payload("b-4", reward=1.0, feedback={"reward": 0.0}),
        factories.incident_payload("b-5", kind="policy", severity="fatal", error=None),
    ]

    response = api.post(BATCH, {"items": items}, key=ingest_key)

    assert response.status_code == 207
    body = response.json()
    results = body["results"]
    assert [r["status"] for r in results] == [202, 202, 422, 422, 202]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (3, 0, 2)
    assert results[0]["warnings"] == [
        {
            "field": "trace_id",
            "message": "Not a known field: kept in metadata under 'trace_id'.",
            "type": "moved_to_metadata",
        }
    ]
    assert results[1]["warnings"] is None and results[4]["warnings"] is None
    assert [e["field"] for e in results[2]["errors"]] == ["region"]
    assert [e["field"] for e in results[3]["errors"]] == ["reward"]

    b1 = Incident.objects.get(client_id="b-1")
    assert (b1.error_message, b1.severity, b1.kind) == ("boom", "medium", "tool_error")
    assert b1.metadata == {"region": "eu", "trace_id": "t-1"}
    b2 = Incident.objects.get(client_id="b-2")
    assert (b2.reward, b2.task) == (1.0, "Refund order 7.")
    b5 = Incident.objects.get(client_id="b-5")
    assert (b5.kind, b5.severity, b5.error_message) == ("policy_violation", "critical", "")
    assert set(Incident.objects.values_list("client_id", flat=True)) == {"b-1", "b-2", "b-5"}


# --- stored messages keep their keys as sent

MESSAGES = [
    {"role": "system", "content": "You are a support agent.", "name": None},
    {"role": "user", "content": "Cancel order 7."},
    {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "cancel_order", "arguments": '{"id": 7}'},
                "index": 0,
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": None},
    {"role": "assistant", "content": [{"type": "text", "text": "Done."}], "audio": None},
]


def test_stored_incident_messages_keep_explicit_nulls_as_sent(api, ingest_key):
    payload = factories.incident_payload("m-1", messages=MESSAGES)

    assert api.post(SINGLE, payload, key=ingest_key).status_code == 202

    stored = Incident.objects.get(client_id="m-1").messages
    assert stored == MESSAGES
    assert json.dumps(stored, sort_keys=True) == json.dumps(MESSAGES, sort_keys=True)


def test_a_message_keeps_only_the_keys_it_was_sent_with(api, ingest_key):
    messages = [
        {"role": "user"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "lookup"}}]},
    ]
    payload = factories.incident_payload("m-2", messages=messages)

    assert api.post(SINGLE, payload, key=ingest_key).status_code == 202

    # No defaults are added, to a message or to its tool calls.
    assert Incident.objects.get(client_id="m-2").messages == messages


def test_batched_incident_messages_keep_explicit_nulls_as_sent(api, ingest_key):
    items = [factories.incident_payload(f"mb-{i}", messages=MESSAGES) for i in range(2)]

    body = api.post(BATCH, {"items": items}, key=ingest_key).json()

    assert [r["status"] for r in body["results"]] == [202, 202]
    for incident in Incident.objects.all():
        assert incident.messages == MESSAGES


# --- trajectories


def _turn(client_id: str, **overrides) -> dict:
    return {"id": client_id, "session_id": "s-1", "messages": MESSAGES, **overrides}


def test_trajectory_messages_keep_explicit_nulls_as_sent(api, ingest_key):
    body = api.post(TRAJECTORIES, {"items": [_turn("tr-1")]}, key=ingest_key).json()

    assert body["results"][0]["status"] == 202
    assert body["results"][0]["warnings"] is None
    assert Trajectory.objects.get(client_id="tr-1").messages == MESSAGES


def test_unknown_trajectory_fields_are_kept_in_metadata_and_reported(api, ingest_key):
    items = [
        _turn("tr-2", latency_ms=812, metadata={"app": "web"}, trace_id="abc"),
        _turn("tr-3", trace_id="new", metadata={"trace_id": "old"}),
    ]

    body = api.post(TRAJECTORIES, {"items": items}, key=ingest_key).json()

    first, second = body["results"]
    assert first["status"] == 202
    assert [w["field"] for w in first["warnings"]] == ["latency_ms", "trace_id"]
    assert Trajectory.objects.get(client_id="tr-2").metadata == {
        "app": "web",
        "latency_ms": 812,
        "trace_id": "abc",
    }
    assert second["status"] == 422
    assert [e["field"] for e in second["errors"]] == ["trace_id"]
    assert not Trajectory.objects.filter(client_id="tr-3").exists()


# --- the fast door and the docs


@pytest.mark.django_db(transaction=True)
def test_the_fast_lane_reads_the_same_shapes_and_answers_the_same_warnings(project, ingest_key):
    payload = factories.incident_payload(
        "f-1",
        error="boom",
        severity="warning",
        kind="gave_up",
        task="Find the order.",
        reward=0.25,
        trace_id="t-1",
        messages=MESSAGES,
    )

    status, _, content, _ = fast(SINGLE, payload, key=ingest_key)

    assert status == 202, content
    assert json.loads(content)["warnings"] == [
        {
            "field": "trace_id",
            "message": "Not a known field: kept in metadata under 'trace_id'.",
            "type": "moved_to_metadata",
        }
    ]
    incident = Incident.objects.get(client_id="f-1")
    assert (incident.error_message, incident.severity, incident.kind) == (
        "boom",
        "medium",
        "gave_up",
    )
    assert (incident.task, incident.reward) == ("Find the order.", 0.25)
    assert incident.metadata == {"region": "eu", "trace_id": "t-1"}
    assert incident.messages == MESSAGES

    status, _, content, _ = fast(SINGLE, {**payload, "id": "f-2", "region": "us"}, key=ingest_key)
    assert status == 422
    assert [e["field"] for e in json.loads(content)["errors"]] == ["region"]


def test_the_api_docs_describe_the_accepted_shapes(client):
    components = client.get("/api/v1/openapi.json").json()["components"]["schemas"]
    incident = components["IncidentIn"]["properties"]

    assert set(incident["kind"]["enum"]) == set(IncidentKind.values)
    assert "wrong_final_state" in incident["kind"]["description"]
    assert "gave_up" in incident["kind"]["description"]
    assert "warning" in incident["severity"]["description"]
    assert {"type": "string"} in incident["error"]["anyOf"]
    assert {"reward", "task", "outcome", "expected_outcome"} <= set(incident)
    assert "warnings" in components["IncidentAccepted"]["properties"]
    assert "warnings" in components["BatchItemResult"]["properties"]
    assert {"task", "outcome", "expected_outcome"} <= set(components["IncidentOut"]["properties"])
