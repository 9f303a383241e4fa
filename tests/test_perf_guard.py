"""Performance regression guards (issue 18): short runs of ``benchmarks/guard.py`` that fail when
MetaClaw gets much slower against a baseline measured in the same run, and pass on a slower
machine (the baseline slows with it).

The limits are generous on purpose: the suite shares 2 cores with PostgreSQL, Redis, the worker
and, on CI, other jobs. Each ratio is of the fastest tries (the least disturbed by other load).
Seen on the 2-core development machine while other test runs loaded it (load average 8-19),
December 2026:

- proxy: fastest 1.6-2.1 ms through the proxy against 0.6 ms direct, 2.9-3.2x; limit 25x.
  A ``time.sleep(0.05)`` in ``proxy_handle`` made it 83x: it failed.
- fast loop: fastest 63-118 ms from the ingest response to the stored proposal against
  1.9-2.9 ms for an empty task's round trip on the same worker, 32-52x; limit 100x. A
  ``time.sleep(0.5)`` at the start of the synthesis made it 366x: it failed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from incidents.models import IncidentGroup, SynthesisStatus
from metaclaw_site.celery import app as celery_app
from skills.library.models import SkillRevision
from skills.runtime import admission, recording
from skills.runtime import policy as runtime_policy
from tests import factories
from tests.asgi_server import asgi_server
from tests.fakes.openai_server import OpenAIServer, Reply
from tests.faults import procs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import guard  # noqa: E402
from fast_loop import _answer_factory, _payload  # noqa: E402

PROXY_LIMIT = 25.0
FAST_LOOP_LIMIT = 100.0
WORKER_APP_NAME = "metaclaw-perf-guard-worker"


@pytest.mark.django_db(transaction=True)
def test_the_proxy_adds_little_to_the_upstreams_own_latency():
    runtime_policy.policy_cache_clear()
    admission.runtime_key_cache_clear()
    with OpenAIServer(default=Reply(content="Hi."), model="guard-model") as upstream:
        project = factories.make_project(
            upstream_base_url=upstream.base_url, upstream_api_key="up-key"
        )
        key = factories.make_key(project, scopes=["runtime"])
        with asgi_server() as proxy_url:
            proxied, direct = guard.proxy_latency(
                proxy_url=proxy_url,
                upstream_url=upstream.base_url,
                runtime_key=key,
                upstream_key="up-key",
            )
            recording.recordings_wait(5)
    figure = guard.Figure("proxy", proxied, direct, PROXY_LIMIT)
    print(figure)
    assert len(upstream.chat_requests()) == 2 * (len(proxied) + 5)
    assert figure.ok, str(figure)


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_the_fast_loop_stays_close_to_an_empty_tasks_round_trip(api, real_broker, tmp_path):
    from base.counters import redis_client

    redis = redis_client()
    redis.flushdb()
    project = factories.make_project()
    key = factories.make_key(project, scopes=["ingest"])
    with OpenAIServer(default=_answer_factory(), model="guard-llm") as llm:
        env = {
            **os.environ,
            **procs.process_env(
                procs.suite_redis_url(),
                llm=llm,
                OPENAI_API_KEY="guard-key",
                METACLAW_LLM_MODEL="guard-llm",
                METACLAW_OUTBOX_SWEEP_AFTER_SECONDS=3600,
                PGAPPNAME=WORKER_APP_NAME,  # to wait for its connections to end
            ),
        }

        def ingest(n: int) -> tuple[float, int]:
            response = api.post("/api/v1/incidents", _payload(n, 0), key=key)
            assert response.status_code == 202, response.content
            return time.time(), response.json()["group_id"]

        def stored_at(group_id: int) -> float | None:
            created = (
                SkillRevision.objects.filter(source_groups=group_id)
                .values_list("created_at", flat=True)
                .first()
            )
            return created.timestamp() if created else None

        with guard.probe_worker(env, tmp_path / "worker.log"):
            try:
                loop, empty = guard.fast_loop_latency(
                    ingest=ingest, stored_at=stored_at, app=celery_app, redis_client=redis
                )
            except TimeoutError:
                pytest.fail((tmp_path / "worker.log").read_text()[-3000:])
        chats = len(llm.chat_requests())
    procs.wait_for_backends_to_end(WORKER_APP_NAME)
    figure = guard.Figure("fast loop", loop, empty, FAST_LOOP_LIMIT)
    print(figure)
    groups = len(loop) + 1  # and the one that warmed the worker up
    proposed = IncidentGroup.objects.filter(synthesis_status=SynthesisStatus.PROPOSED)
    assert proposed.filter(project=project).count() == groups
    assert chats == groups
    assert figure.ok, str(figure)
