"""Redis stops while the fast worker is inside a synthesis (the LLM takes seconds), and comes
back. The task ends after the worker's consumer lost its broker connection; kombu 5.7.0 then
raised ``AttributeError`` closing that connection, Celery called it "Unrecoverable" and the
worker exited (the xfail ``test_redis_down_ingest.py`` kept meeting under load). With
``metaclaw_site/redis_broker.py`` the same worker finishes the synthesis, reconnects when Redis
is back and proposes the next group's skill."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from incidents.models import IncidentGroup, SynthesisStatus
from skills.library.models import SkillRevision
from tests import factories
from tests.fakes.openai_server import Reply
from tests.faults import procs
from tests.faults.synthesis_stack import iso_dates_reply, synthesis_stack

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

LLM_SECONDS = 5.0


def _answers() -> Callable[[dict], Reply]:
    """The LLM's answers in turn: each group's skill of its own (not a near copy)."""
    calls = itertools.count()

    def answer(body: dict) -> Reply:
        case = "first" if next(calls) == 0 else "second"
        return iso_dates_reply(f"iso-dates-{case}", f"ISO dates, {case}", case, LLM_SECONDS)

    return answer


def _wait_proposed(project, error_type: str, log, seconds: float) -> IncidentGroup:
    deadline = time.monotonic() + seconds
    while True:
        group = IncidentGroup.objects.filter(project=project, error_type=error_type).first()
        if group is not None and group.synthesis_status == SynthesisStatus.PROPOSED:
            return group
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_a_worker_that_loses_redis_mid_synthesis_finishes_it_and_reconnects(
    api, project, ingest_key, tmp_path, monkeypatch
):
    log = tmp_path / "midtask.log"
    with synthesis_stack(tmp_path, monkeypatch, _answers(), "midtask") as stack:
        port = int(stack.env["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        first = factories.incident_payload(error={"type": "FirstFailureError", "message": "one"})
        assert api.post("/api/v1/incidents", first, key=ingest_key).status_code in (200, 202)
        deadline = time.monotonic() + 60
        while not stack.llm.chat_requests():  # the synthesis is waiting on the LLM
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)

        stack.redis.terminate()
        stack.redis.wait(timeout=10)
        group = _wait_proposed(project, "FirstFailureError", log, 60)
        time.sleep(2)  # the task's acknowledgement, on the lost connection
        assert stack.worker.poll() is None, log.read_text()[-3000:]
        assert "Unrecoverable" not in log.read_text()

        stack.redis, _ = procs.start_redis(tmp_path, port)
        deadline = time.monotonic() + 60
        while log.read_text().count("Connected to") < 2:  # the consumer is back
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        second = factories.incident_payload(error={"type": "SecondFailureError", "message": "two"})
        assert api.post("/api/v1/incidents", second, key=ingest_key).status_code in (200, 202)
        second_group = _wait_proposed(project, "SecondFailureError", log, 90)
        assert stack.worker.poll() is None

    assert group.synthesis_attempts == 1
    assert second_group.synthesis_attempts == 1
    # One proposal from each group, each written once.
    revisions = SkillRevision.objects.filter(skill__project=project)
    assert sorted(r.source_groups.get().pk for r in revisions) == sorted(
        [group.pk, second_group.pk]
    )
    assert len(stack.llm.chat_requests()) == 2
