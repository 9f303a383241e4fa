"""Ingestion on the ASGI fast lane: the same answers as the Django door, for the same input."""

from __future__ import annotations

import json
import time

import pytest
from asgiref.sync import async_to_sync

from base.fast_lane import fast_lane
from base.models import Project
from incidents import signals
from incidents.fast_lane import ROUTES
from incidents.models import Incident, IncidentGroup, SynthesisStatus, Trajectory
from tests import factories

# The fast lane runs the service on a worker thread: it must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


def fast(path, body, key=None, headers=None, raw=False):
    """POST through the fast lane, in process: (status, headers, body bytes, body reads)."""
    return async_to_sync(afast)(path, body, key=key, headers=headers, raw=raw)


async def afast(path, body, key=None, headers=None, raw=False):
    """``fast`` in the caller's event loop, so that several can run at once."""

    async def django_app(scope, receive, send):
        raise AssertionError(f"{scope['path']} was served by Django")

    data = body if raw else json.dumps(body)
    data = data.encode() if isinstance(data, str) else data
    sent, reads = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(message):
        sent.append(message)

    all_headers = {"host": "testserver", "content-type": "application/json"}
    if key:
        all_headers["authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
        "server": ("testserver", 80),
    }
    await fast_lane(django_app, ROUTES)(scope, receive, send)
    response_headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], response_headers, sent[1]["body"], len(reads)


def both(api, path, body, key=None, raw=False):
    """The same request through both doors: ((status, json), (status, json)), Django first."""
    django = api.post(path, body, key=key, raw=raw)
    status, _, content, _ = fast(path, body, key=key, raw=raw)
    return (django.status_code, django.json()), (status, json.loads(content))


def test_a_new_incident_answers_202_then_200_and_is_stored(project, ingest_key):
    announced = []

    def on_announce(sender, group_ids, **kwargs):
        announced.extend(group_ids)

    signals.groups_await_synthesis.connect(on_announce)
    try:
        first = fast("/api/v1/incidents", factories.incident_payload("f-1"), key=ingest_key)
        again = fast("/api/v1/incidents", factories.incident_payload("f-1"), key=ingest_key)
    finally:
        signals.groups_await_synthesis.disconnect(on_announce)

    assert first[0] == 202, first[2]
    assert first[1]["content-type"] == "application/json; charset=utf-8"
    body = json.loads(first[2])
    assert list(body) == ["id", "client_id", "group_id", "status", "duplicate", "warnings"]
    assert body["duplicate"] is False
    assert again[0] == 200
    assert json.loads(again[2]) == {**body, "duplicate": True}
    incident = Incident.objects.get()
    assert (str(incident.pk), incident.client_id, incident.project) == (body["id"], "f-1", project)
    assert incident.group_id == body["group_id"]
    # The after-commit announcement fired from the worker thread (eager Celery then ran it).
    assert announced == [body["group_id"]]
    group = IncidentGroup.objects.get()
    assert group.event_count == 1
    assert group.synthesis_status != SynthesisStatus.NONE


def test_the_same_input_gets_the_same_answer_on_both_doors(api, ingest_key, settings):
    settings.METACLAW = {**settings.METACLAW, "BATCH_MAX_ITEMS": 3}
    payload = factories.incident_payload("x", kind="explosion", severity="huge")
    del payload["agent"]
    surrogate = json.dumps(factories.incident_payload(error={"type": "X", "message": "\ud800"}))
    cases = [
        ("/api/v1/incidents", payload, False),
        ("/api/v1/incidents", "{not json", True),
        ("/api/v1/incidents", "", True),
        ("/api/v1/incidents", "[]", True),
        ("/api/v1/incidents", "null", True),
        (
            "/api/v1/incidents",
            '{"id": "x", "agent": {"name": "a"}, "kind": "other", "feedback": {"score": NaN}}',
            True,
        ),  # fmt: skip
        ("/api/v1/incidents", "[" * 5000 + "]" * 5000, True),
        ("/api/v1/incidents", surrogate, True),
        ("/api/v1/incidents/batch", {"items": []}, False),
        ("/api/v1/incidents/batch", {"items": "no"}, False),
        ("/api/v1/incidents/batch", {"items": [factories.incident_payload()] * 4}, False),
        ("/api/v1/trajectories/batch", {"items": [{"id": "t\u0000", "messages": []}]}, False),
    ]
    for path, body, raw in cases:
        django, fast_answer = both(api, path, body, key=ingest_key, raw=raw)
        assert django == fast_answer, (path, body if raw else "")
        assert django[0] < 500  # a 4xx, or 207 with the item refused
    assert Incident.objects.count() == 0


def test_refusals_match_the_django_door(api, project, ingest_key, settings):
    runtime_key = factories.make_key(project, scopes=["runtime"])
    revoked = factories.make_key(project, scopes=["ingest"], name="old")
    from base.models import ApiKey

    ApiKey.objects.filter(name="old").update(revoked_at="2020-01-01T00:00:00Z")
    payload = factories.incident_payload("r")

    for key in (None, "mc_nope", revoked):
        django = api.post("/api/v1/incidents", payload, key=key)
        status, headers, content, reads = fast("/api/v1/incidents", payload, key=key)
        assert (status, json.loads(content)) == (401, django.json())
        assert headers["www-authenticate"] == django["WWW-Authenticate"] == "Bearer"
        assert reads == 0  # refused before reading the body

    django, fast_answer = both(api, "/api/v1/incidents/batch", {"items": [payload]}, runtime_key)
    assert django == fast_answer
    assert django[0] == 403

    settings.METACLAW = {**settings.METACLAW, "BATCH_MAX_BODY_BYTES": 10_000}
    items = [factories.incident_payload(f"s-{i}", metadata={"pad": "x" * 3000}) for i in range(5)]
    data = json.dumps({"items": items})
    django = api.post("/api/v1/incidents/batch", data, key=ingest_key, raw=True)
    declared = fast(
        "/api/v1/incidents/batch",
        data,
        key=ingest_key,
        headers={"content-length": str(len(data))},
        raw=True,
    )
    streamed = fast("/api/v1/incidents/batch", data, key=ingest_key, raw=True)
    assert (declared[0], json.loads(declared[2])) == (413, django.json())
    assert declared[3] == 0
    assert streamed[0] == 413
    assert Incident.objects.count() == 0


def test_the_rate_limit_applies_on_the_fast_lane(project, ingest_key):
    Project.objects.filter(pk=project.pk).update(rate_limit_per_minute=1)
    payload = factories.incident_payload("rl")
    while time.time() % 60 > 58.5:  # the limit counts per clock minute: not across one
        time.sleep(0.1)

    first = fast("/api/v1/incidents", payload, key=ingest_key)
    second = fast("/api/v1/incidents", payload, key=ingest_key)

    assert first[0] == 202
    assert second[0] == 429
    body = json.loads(second[2])
    assert body["code"] == "rate_limited"
    assert second[1]["retry-after"] == str(body["retry_after"])


def test_a_batch_with_one_bad_item_answers_207_like_the_django_door(api, project, ingest_key):
    def items(prefix):
        return [
            factories.incident_payload(f"{prefix}-1"),
            {"id": f"{prefix}-2", "kind": "nope"},
            factories.incident_payload(f"{prefix}-1"),
        ]

    django = api.post("/api/v1/incidents/batch", {"items": items("d")}, key=ingest_key)
    status, _, content, _ = fast("/api/v1/incidents/batch", {"items": items("f")}, key=ingest_key)

    body = json.loads(content)
    assert status == 207
    assert [r["status"] for r in body["results"]] == [202, 422, 200]
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 1, 1)
    assert body["results"][2]["id"] == body["results"][0]["id"]

    def shape(answer):  # ids differ between the two batches; everything else matches
        return json.loads(
            json.dumps(answer).replace('"d-', '"x-').replace('"f-', '"x-'),
            object_hook=lambda d: {k: v for k, v in d.items() if k not in {"id", "group_id"}},
        )

    assert shape(body) == shape(django.json())
    assert set(Incident.objects.values_list("client_id", flat=True)) == {"d-1", "f-1"}


def test_trajectories_batch_on_the_fast_lane(ingest_key):
    items = [{"id": "t-1", "messages": [{"role": "user", "content": "hi"}]}]
    first = fast("/api/v1/trajectories/batch", {"items": items}, key=ingest_key)
    again = fast("/api/v1/trajectories/batch", {"items": items}, key=ingest_key)

    assert first[0] == again[0] == 207
    assert json.loads(first[2])["results"][0]["status"] == 202
    assert json.loads(again[2])["results"][0]["status"] == 200
    assert Trajectory.objects.count() == 1


def test_a_failing_handler_answers_500_in_the_apis_shape(project, ingest_key, monkeypatch):
    import incidents.fast_lane

    def broken(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(incidents.fast_lane, "incident_answers", broken)

    status, headers, content, _ = fast(
        "/api/v1/incidents", factories.incident_payload("x"), key=ingest_key
    )

    assert status == 500
    assert headers["content-type"].startswith("application/json")
    assert json.loads(content)["code"] == "internal_error"
    assert "boom" not in content.decode()
    assert not Incident.objects.exists()


def test_the_fast_lane_applies_the_security_middlewares_rules(api, ingest_key, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_HSTS_SECONDS = 3600
    payload = factories.incident_payload("tls")

    status, headers, _, _ = fast("/api/v1/incidents", payload, key=ingest_key)
    django = api.post("/api/v1/incidents", payload, key=ingest_key)

    assert (status, headers["location"]) == (301, "https://testserver/api/v1/incidents")
    assert (django.status_code, django["Location"]) == (301, headers["location"])
    assert not Incident.objects.exists()

    status, headers, _, _ = fast(
        "/api/v1/incidents", payload, key=ingest_key, headers={"x-forwarded-proto": "https"}
    )
    django = api.client.post(
        "/api/v1/incidents",
        json.dumps(factories.incident_payload("tls-django")),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {ingest_key}",
        HTTP_X_FORWARDED_PROTO="https",
    )
    assert (status, django.status_code) == (202, 202)
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"] == "max-age=3600"
    # Every header Django's SecurityMiddleware adds, as Django's door adds it.
    for name in (
        "x-content-type-options",
        "strict-transport-security",
        "referrer-policy",
        "cross-origin-opener-policy",
    ):
        assert headers[name] == django[name], name


def test_a_body_over_djangos_upload_ceiling_is_refused_on_both_doors(api, ingest_key, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2_000
    payload = factories.incident_payload("big", metadata={"notes": "x" * 3_000})

    (django_status, django_body), (fast_status, fast_body) = both(
        api, "/api/v1/incidents", payload, key=ingest_key
    )

    assert fast_status == django_status == 413
    assert fast_body["code"] == django_body["code"]
    assert not Incident.objects.exists()
