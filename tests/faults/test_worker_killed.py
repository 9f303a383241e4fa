"""Issue 21, item 9: the fast worker killed with SIGKILL in the middle of synthesis. Real Redis
(a private redis-server), a real Celery worker with its beat, our loopback LLM answering in 3 s,
and the test PostgreSQL database. Every group must be proposed, exactly once, within 2 minutes
of the worker's restart: the claims' leases run out and the sweep puts them back in the queue."""

from __future__ import annotations

import json
import time

import pytest

from incidents.models import IncidentGroup, SynthesisStatus
from skills.library.models import SkillRevision
from tests.fakes.openai_server import Reply
from tests.faults import procs
from tests.faults.synthesis_stack import ingest_failure_modes, iso_dates_reply, synthesis_stack

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

GROUPS = 8
LEASE_SECONDS = 10


def _answer(body: dict) -> Reply:
    text = json.dumps(body.get("messages", []))
    slug = "fix-" + str(abs(hash(text)) % 10**8)
    return iso_dates_reply(slug, f"Skill {slug}", delay=3.0)


def test_a_worker_killed_mid_synthesis_leaves_no_group_running(
    api, project, ingest_key, tmp_path, monkeypatch
):
    with synthesis_stack(
        tmp_path,
        monkeypatch,
        _answer,
        "first",
        METACLAW_SYNTHESIS_LEASE_SECONDS=LEASE_SECONDS,
        METACLAW_OUTBOX_SWEEP_AFTER_SECONDS=5,
    ) as stack:
        ingest_failure_modes(api, ingest_key, GROUPS)
        deadline = time.monotonic() + 90
        while not IncidentGroup.objects.filter(synthesis_status=SynthesisStatus.RUNNING).exists():
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # mid-call: the LLM takes 3 s
        in_flight = IncidentGroup.objects.filter(synthesis_status=SynthesisStatus.RUNNING).count()
        procs.kill_group(stack.worker)
        killed_at = time.monotonic()
        time.sleep(2)
        stack.worker = procs.start_worker(stack.env, tmp_path, "second")
        restarted = time.monotonic()
        deadline = restarted + 120
        while IncidentGroup.objects.exclude(synthesis_status=SynthesisStatus.PROPOSED).exists():
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()[-4000:]
            time.sleep(0.5)
        took = time.monotonic() - restarted
        print(
            f"\nSIGKILL with {in_flight} of {GROUPS} groups in flight: every group proposed "
            f"{took:.1f} s after the restart ({time.monotonic() - killed_at:.1f} s after the "
            f"kill; lease {LEASE_SECONDS} s)"
        )
        assert (
            IncidentGroup.objects.filter(synthesis_status=SynthesisStatus.PROPOSED).count()
            == GROUPS
        )
        time.sleep(LEASE_SECONDS)  # a late duplicate would propose again now
        per_group = [
            SkillRevision.objects.filter(source_groups=g).count()
            for g in IncidentGroup.objects.all()
        ]
        assert per_group == [1] * GROUPS
