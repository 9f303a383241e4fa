from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from incidents import services
from incidents.models import IncidentGroup, SynthesisStatus
from skills.synthesis.tasks import sweep_waiting_groups
from tests import factories

pytestmark = pytest.mark.django_db


def test_ingest_announces_a_waiting_group_once_after_commit(
    api, ingest_key, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        api.post("/api/v1/incidents", factories.incident_payload("a"), key=ingest_key)
    assert len(callbacks) == 1  # the group now waits for the fast loop

    with django_capture_on_commit_callbacks() as callbacks:
        api.post("/api/v1/incidents", factories.incident_payload("b"), key=ingest_key)
    # Same group, already waiting: more evidence, no second announcement.
    assert callbacks == []
    assert IncidentGroup.objects.get().event_count == 2


def test_only_one_worker_can_claim_a_waiting_group(api, ingest_key):
    api.post("/api/v1/incidents", factories.incident_payload("a"), key=ingest_key)
    group = IncidentGroup.objects.get()

    claimed = services.group_synthesis_claim(group_id=group.id)
    assert (claimed.pk, claimed.synthesis_status, claimed.synthesis_attempts) == (
        group.pk,
        SynthesisStatus.RUNNING,
        1,
    )
    assert services.group_synthesis_claim(group_id=group.id) is None
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.RUNNING
    assert group.synthesis_attempts == 1


def test_sweep_enqueues_groups_left_waiting(api, ingest_key, settings):
    settings.LLM = {**settings.LLM, "BASE_URL": "", "MODEL": ""}
    api.post("/api/v1/incidents", factories.incident_payload("a"), key=ingest_key)
    fresh = IncidentGroup.objects.get()
    assert fresh.synthesis_status == SynthesisStatus.WAITING

    # A waiting group younger than the sweep age is left to its own message.
    assert sweep_waiting_groups() == 0
    IncidentGroup.objects.update(synthesis_requested_at=timezone.now() - timedelta(minutes=5))
    assert sweep_waiting_groups() == 1

    fresh.refresh_from_db()
    assert fresh.synthesis_status != SynthesisStatus.WAITING
