"""Retries of the fast loop (issue 21, items 9 and 10), in process against the real test
database and our loopback LLM: a backoff that neither the claim nor the sweep shortens, the
Retry-After honoured, a visible failure with its reason only after the stated total time, and
a person's retry of a stuck group."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone

from base.pii import get_detector
from incidents import services as incident_services
from incidents.models import IncidentGroup, SynthesisStatus
from skills.library.embeddings import get_embedder
from skills.library.models import SkillRevision
from skills.synthesis import receivers as synthesis_receivers
from skills.synthesis import services as synthesis
from skills.synthesis.lease import lease_kept
from tests.fakes.openai_server import Reply
from tests.skills.test_synthesis import _waiting_group, answer


def _group_json(api, key, group_id):
    response = api.get(f"/api/v1/groups/{group_id}", key=key)
    assert response.status_code == 200, response.content
    return response.json()


def test_a_429_with_retry_after_defers_the_group_and_nothing_claims_it_sooner(
    api, project, admin_key, llm_server
):
    llm_server.enqueue(Reply(status=429, headers={"Retry-After": "60"}))
    group = _waiting_group(project)

    started = time.monotonic()
    with pytest.raises(synthesis.SynthesisRetryLater) as caught:
        synthesis.group_synthesize(group_id=group.pk)
    took = time.monotonic() - started

    assert caught.value.countdown == 60  # the server's Retry-After, not slept in the worker
    assert len(llm_server.chat_requests()) == 1  # the SDK did not sleep 60 s and call again
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING
    assert group.synthesis_requested_at >= timezone.now() + timedelta(seconds=58)
    # A duplicate message, or the sweep, finds nothing due: no call before the Retry-After.
    assert synthesis.group_synthesize(group_id=group.pk) is None
    assert group.pk not in incident_services.groups_waiting_for_synthesis(older_than_seconds=0)
    assert len(llm_server.chat_requests()) == 1
    body = _group_json(api, admin_key, group.pk)
    print(
        f"\n429 Retry-After 60: synthesis returned in {took:.1f} s (first embedding load "
        f"included), next try due in {caught.value.countdown:.0f} s; API: {body}"
    )
    assert body["synthesis_status"] == "waiting"
    assert "rate limited (429)" in body["synthesis_error"]
    assert body["synthesis_attempts"] == 1
    assert body["synthesis_next_attempt_at"] is not None


def test_backoff_without_retry_after_grows_and_is_capped():
    delays = [synthesis.retry_delay(n, None) for n in range(1, 9)]
    print(f"\nbackoff without Retry-After: {[round(d) for d in delays]} s")
    assert 4 <= delays[0] <= 6 and delays[1] > delays[0]
    assert max(delays) <= synthesis.RETRY_MAX_DELAY_SECONDS * 1.15
    assert synthesis.retry_delay(3, 60) == 60


def test_the_group_fails_visibly_only_after_the_stated_total_time_and_a_retry_works(
    api, project, admin_key, llm_server, settings
):
    llm_server.default = Reply(status=500)
    group = _waiting_group(project)
    give_up = settings.METACLAW["SYNTHESIS_GIVE_UP_SECONDS"]

    # Failing for a minute: still retrying.
    with pytest.raises(synthesis.SynthesisRetryLater):
        synthesis.group_synthesize(group_id=group.pk, retrying_since=time.time() - 60)
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING

    # Failing for the whole stated time: FAILED, with its reason in the API.
    incident_services.group_request_synthesis(
        group_id=group.pk, from_statuses=[SynthesisStatus.WAITING]
    )
    status = synthesis.group_synthesize(group_id=group.pk, retrying_since=time.time() - give_up)
    assert status == SynthesisStatus.FAILED
    body = _group_json(api, admin_key, group.pk)
    print(f"\nafter {give_up} s of 500s: {body['synthesis_status']}: {body['synthesis_error']}")
    assert body["synthesis_status"] == "failed"
    assert "server error (500)" in body["synthesis_error"] and "gave up" in body["synthesis_error"]

    llm_server.default = Reply(content=answer())
    response = api.post(f"/api/v1/groups/{group.pk}/retry-synthesis", {}, key=admin_key)
    assert response.status_code == 202, response.content
    assert synthesis.group_synthesize(group_id=group.pk) == SynthesisStatus.PROPOSED


def test_a_person_can_retry_a_group_whose_worker_died_but_not_one_still_in_hand(
    api, project, admin_key, settings
):
    group = _waiting_group(project)
    assert incident_services.group_synthesis_claim(group_id=group.pk) is not None

    response = api.post(f"/api/v1/groups/{group.pk}/retry-synthesis", {}, key=admin_key)
    assert response.status_code == 409  # its lease is fresh: a worker has it

    settings.METACLAW = {**settings.METACLAW, "SYNTHESIS_LEASE_SECONDS": 0}
    response = api.post(f"/api/v1/groups/{group.pk}/retry-synthesis", {}, key=admin_key)
    assert response.status_code == 202, response.content
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.WAITING
    assert group.synthesis_attempts == 0


def test_the_sweep_releases_a_running_group_once_its_lease_runs_out(project, settings):
    group = _waiting_group(project)
    incident_services.group_synthesis_claim(group_id=group.pk)
    assert synthesis.groups_stale_running_release(older_than_seconds=30) == 0
    assert incident_services.groups_synthesis_heartbeat(group_ids=[group.pk]) == 1
    time.sleep(0.05)
    assert synthesis.groups_stale_running_release(older_than_seconds=0.01) == 1
    assert IncidentGroup.objects.get(pk=group.pk).synthesis_status == SynthesisStatus.WAITING


def test_health_checks_answer_liveness_and_readiness_apart(client, transactional_db):
    live = client.get("/healthz?probe=live")
    assert live.status_code == 200 and live.json()["probe"] == "live"
    started = time.monotonic()
    ready = client.get("/healthz")
    assert time.monotonic() - started < 1.0
    assert ready.status_code == 200, ready.content
    assert ready.json()["checks"]["database"] == "ok"


@pytest.mark.django_db(transaction=True)
def test_a_synthesis_that_outlasts_its_lease_keeps_renewing_its_claim(
    project, llm_server, settings, monkeypatch
):
    # Loaded first, so that loading them holds no lock while the lease is measured.
    get_embedder()
    get_detector()
    with lease_kept(0):  # the process's renewer now sleeps a quarter of the default lease (45 s)
        pass
    settings.METACLAW = {**settings.METACLAW, "SYNTHESIS_LEASE_SECONDS": 1.0}
    settings.LLM = {**settings.LLM, "TIMEOUT_SECONDS": 10}
    llm_server.enqueue(Reply(content=answer(), delay=3.0))  # three leases long
    # Committed, so no eager task may synthesise it first: this test is the worker.
    monkeypatch.setattr(synthesis_receivers, "enqueue", lambda *args: True)
    group = _waiting_group(project)

    outcome: dict = {}

    def synthesise() -> None:
        try:
            outcome["status"] = synthesis.group_synthesize(group_id=group.pk)
        finally:
            connections.close_all()  # this thread's own

    worker = threading.Thread(target=synthesise)
    worker.start()
    released = 0
    while worker.is_alive():
        # What the sweep does every few seconds: take back groups whose lease ran out.
        released += synthesis.groups_stale_running_release(older_than_seconds=1.0)
        time.sleep(0.05)
    worker.join()

    assert released == 0
    assert outcome["status"] == SynthesisStatus.PROPOSED
    group.refresh_from_db()
    assert group.synthesis_status == SynthesisStatus.PROPOSED
    assert SkillRevision.objects.filter(source_groups=group).count() == 1
    assert len(llm_server.chat_requests()) == 1
