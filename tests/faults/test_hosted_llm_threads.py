"""Issue 18: a hosted LLM takes seconds to answer, and a prefork worker holds one of its few
processes for all of that wait (``benchmarks/fast_loop.py --llm-latency 2``: p50 26 s for a
burst of 100 groups with 4 processes). docs/deploy.md runs the fast worker with a thread pool
for such a model; this test runs one (8 threads, the loopback LLM answering in 2 s) on a
connection pool of 2 and shows that the syntheses wait on the LLM together, each claimed once:
a synthesis gives its database connection back while the LLM thinks, so 8 waiting syntheses do
not need 8 connections (holding them, 6 of the 8 would time out on the pool and be retried).
How long the burst takes is a benchmark's figure (``benchmarks/fast_loop.py``), not this test's:
the worker starts while the incidents arrive, and its start-up under CI load took 6-12 s."""

from __future__ import annotations

import json
import threading
import time

import pytest

from incidents.models import IncidentGroup, SynthesisStatus
from skills.library.models import SkillRevision
from tests.fakes.openai_server import Reply
from tests.faults.synthesis_stack import ingest_failure_modes, iso_dates_reply, synthesis_stack

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

GROUPS = 8
LLM_SECONDS = 2.0


class InFlight:
    """How many calls the loopback LLM held at once, at the most."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self._lock = threading.Lock()

    def answer(self, body: dict) -> Reply:
        text = json.dumps(body.get("messages", []))
        slug = "fix-" + str(abs(hash(text)) % 10**8)
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            # The reply's own delay would run after this returns; wait here to count the call
            # as in flight for the whole of it.
            time.sleep(LLM_SECONDS)
            return iso_dates_reply(slug, f"Skill {slug}")
        finally:
            with self._lock:
                self.now -= 1


def test_a_thread_pool_worker_waits_on_a_slow_llm_for_many_groups_with_two_connections(
    api, project, ingest_key, tmp_path, monkeypatch
):
    in_flight = InFlight()
    with synthesis_stack(
        tmp_path,
        monkeypatch,
        in_flight.answer,
        "threads",
        pool="threads",
        concurrency=GROUPS,
        METACLAW_DB_POOL_MAX_SIZE=2,
    ):
        ingest_failure_modes(api, ingest_key, GROUPS)
        deadline = time.monotonic() + 90
        while (
            IncidentGroup.objects.filter(synthesis_status=SynthesisStatus.PROPOSED).count() < GROUPS
        ):
            assert time.monotonic() < deadline, (tmp_path / "threads.log").read_text()[-3000:]
            time.sleep(0.2)

    groups = list(IncidentGroup.objects.filter(project=project))
    assert len(groups) == GROUPS
    # Each claimed once: no synthesis failed for want of a connection and came back later.
    assert [g.synthesis_attempts for g in groups] == [1] * GROUPS, [
        (g.pk, g.synthesis_attempts, g.synthesis_error) for g in groups
    ]
    assert SkillRevision.objects.filter(skill__project=project).count() == GROUPS
    # Several waits at once on two connections: a synthesis that held its connection through
    # the wait would leave at most 2 of them waiting on the LLM together.
    assert in_flight.most >= 4, in_flight.most
