"""Ingestion in the embedded mode (SQLite), end to end: it has raw SQL of its own.

The suite's database is PostgreSQL, so this runs a short script in a fresh process with no
DATABASE_URL, against a SQLite file in a temporary directory, and checks what it reports."""

from __future__ import annotations

from tests.embedded import run_embedded

SCRIPT = r"""
import json

import django

django.setup()

from django.core.management import call_command
from django.db import connection
from django.test import Client

from incidents import signals
from incidents.models import GroupStatus, Incident, IncidentGroup, SynthesisStatus
from base import services
from metaclaw_site.projects import project_create
from tests import factories

call_command("migrate", verbosity=0)
project = project_create(name="Embedded")
key = services.api_key_create(project=project, name="k", scopes=["ingest"]).secret
client = Client()
announced = []
signals.groups_await_synthesis.connect(
    lambda sender, group_ids, **kw: announced.extend(group_ids), weak=False
)


def batch(items):
    response = client.post(
        "/api/v1/incidents/batch", json.dumps({"items": items}), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )
    assert response.status_code == 207, response.content
    return response.json()["results"]


dirty = factories.incident_payload("a", occurred_at="2026-01-02T03:04:05.123456+00:00")
dirty["messages"][0]["content"] = "where\u0000 is it"
dirty["metadata"] = {"k\u0000": ["v\ud800"], "nan": float("nan")}
first = batch([dirty, factories.incident_payload("b"), factories.incident_payload("a")])
group = IncidentGroup.objects.get()
after_first = {"count": group.event_count, "synthesis": group.synthesis_status}
announced_first = list(announced)
IncidentGroup.objects.update(status=GroupStatus.RESOLVED)
second = batch([factories.incident_payload("b"), factories.incident_payload("c", severity="critical")])
group.refresh_from_db()
stored = Incident.objects.get(client_id="a")
print(json.dumps({
    "vendor": connection.vendor,
    "first": first,
    "second": second,
    "after_first": after_first,
    "announced_first": announced_first,
    "group": {
        "id": group.id, "count": group.event_count, "status": group.status,
        "severity": group.severity, "regressed": group.regressed_at is not None,
        "synthesis": group.synthesis_status,
    },
    "incidents": sorted(Incident.objects.values_list("client_id", flat=True)),
    "ids": {i.client_id: str(i.id) for i in Incident.objects.all()},
    "stored": {
        "messages0": stored.messages[0], "metadata": stored.metadata,
        "occurred_at": stored.occurred_at.isoformat(), "tool": stored.tool_name,
    },
}))
"""


def test_embedded_mode_ingests_batches_on_sqlite(tmp_path):
    out = run_embedded(SCRIPT, tmp_path)
    assert out["vendor"] == "sqlite"

    assert [r["status"] for r in out["first"]] == [202, 202, 200]
    assert out["first"][2]["id"] == out["first"][0]["id"] == out["ids"]["a"]
    assert out["after_first"] == {"count": 2, "synthesis": "waiting"}
    assert out["announced_first"] == [out["group"]["id"]]  # raw RETURNING read right on SQLite
    assert [r["status"] for r in out["second"]] == [200, 202]
    assert out["second"][0]["id"] == out["ids"]["b"]
    assert out["group"] == {
        "id": out["group"]["id"],
        "count": 3,
        "status": "regressed",
        "severity": "critical",
        "regressed": True,
        "synthesis": "waiting",
    }
    assert out["incidents"] == ["a", "b", "c"]
    assert out["stored"] == {
        "messages0": {"role": "user", "content": "where is it"},
        "metadata": {"k": ["v?"], "nan": None},
        "occurred_at": "2026-01-02T03:04:05.123456+00:00",
        "tool": "search_orders",
    }
