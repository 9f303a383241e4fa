from __future__ import annotations

import json
import threading

import pytest
from django.db import connection
from django.test import Client

from incidents.models import Incident, IncidentGroup
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)


def _post_concurrently(bodies: list[dict], key: str, path: str = "/api/v1/incidents") -> list[int]:
    barrier = threading.Barrier(len(bodies))
    statuses: list[int] = []

    def worker(body: dict) -> None:
        client = Client()
        barrier.wait()
        try:
            response = client.post(
                path, json.dumps(body), content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {key}",
            )  # fmt: skip
            statuses.append(response.status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return statuses


def test_the_same_client_id_sent_at_once_is_stored_once():
    project = factories.make_project()
    key = factories.make_key(project, scopes=["ingest"])
    statuses = _post_concurrently([factories.incident_payload("same")] * 6, key)

    assert sorted(statuses).count(202) == 1 and sorted(statuses).count(200) == 5
    assert Incident.objects.filter(project=project).count() == 1
    assert IncidentGroup.objects.get(project=project).event_count == 1


def test_a_new_group_hit_by_many_requests_at_once_counts_every_incident():
    project = factories.make_project()
    key = factories.make_key(project, scopes=["ingest"])
    statuses = _post_concurrently([factories.incident_payload(f"c-{i}") for i in range(8)], key)

    assert statuses == [202] * 8
    group = IncidentGroup.objects.get(project=project)
    assert group.event_count == 8 == Incident.objects.filter(group=group).count()


def test_overlapping_batches_do_not_deadlock_or_lose_counts():
    project = factories.make_project()
    key = factories.make_key(project, scopes=["ingest"])
    kinds = ["tool_error", "timeout", "wrong_answer", "other"]
    bodies = [
        {
            "items": [
                factories.incident_payload(f"b{n}-{i}", kind=kinds[(i + n) % 4]) for i in range(20)
            ]
        }
        for n in range(4)
    ]
    statuses = _post_concurrently(bodies, key, path="/api/v1/incidents/batch")

    assert statuses == [207] * 4
    assert Incident.objects.filter(project=project).count() == 80
    assert (
        sum(IncidentGroup.objects.filter(project=project).values_list("event_count", flat=True))
        == 80
    )
