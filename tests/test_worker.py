"""The fast loop with a REAL Celery worker process against Redis and the test database.

Ingest goes through the HTTP API (the Django test client, committing for real); the worker, a
separate ``celery worker`` process, takes the task from Redis, asks our loopback LLM and stores
the proposal in the same PostgreSQL test database."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from incidents.models import IncidentGroup, SynthesisStatus
from metaclaw_site.celery import app as celery_app
from skills.library.models import Origin, SkillRevision
from tests import factories
from tests.fakes.openai_server import OpenAIServer, Reply, skill_answer
from tests.faults import procs

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


ANSWER = skill_answer(
    diagnosis="The agent passed a relative date where search_orders needs ISO 8601.",
    slug="iso-dates-for-order-search",
    name="ISO dates for order search",
    description="When calling search_orders with a date the user gave in words.",
    instructions="Convert relative dates to ISO 8601 (YYYY-MM-DD) first.",
)


WORKER_APP_NAME = "metaclaw-test-worker"


@pytest.fixture(scope="module")
def _module_llm_server():
    with OpenAIServer(default=Reply(content=ANSWER), model="loopback-model") as server:
        yield server


@pytest.fixture
def llm_server(_module_llm_server):
    _module_llm_server.default = Reply(content=ANSWER)
    _module_llm_server.requests.clear()
    return _module_llm_server


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker, _module_llm_server, tmp_path_factory):
    """One worker for this module (starting one takes seconds on a busy machine). Prefork with
    one child, as in production: tasks run in a forked child, where Celery's Django fixup
    manages the database connections."""
    from base.counters import redis_client

    redis_client().flushdb()  # no stale task messages from an earlier run
    logs = tmp_path_factory.mktemp("worker")
    env = procs.process_env(
        procs.suite_redis_url(),
        llm=_module_llm_server,
        METACLAW_OUTBOX_SWEEP_AFTER_SECONDS=0,
        PGAPPNAME=WORKER_APP_NAME,  # libpq names the worker's connections
    )
    process = procs.start_worker(env, logs, "worker-0", concurrency=1, beat=False)
    yield logs
    procs.stop(process)
    with django_db_blocker.unblock():
        procs.wait_for_backends_to_end(WORKER_APP_NAME)


def _wait_for(predicate, timeout: float = 90.0, what: str = "the worker", logs: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    detail = ""
    if logs is not None:
        detail = "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("worker-*.log")))
    pytest.fail(f"Timed out waiting for {what}.\n{detail}")


def test_the_worker_turns_an_ingested_incident_into_a_proposed_skill(
    api, project, ingest_key, llm_server, real_broker, worker
):

    response = api.post("/api/v1/incidents", factories.incident_payload("w-1"), key=ingest_key)
    assert response.status_code == 202
    group_id = response.json()["group_id"]

    _wait_for(
        lambda: IncidentGroup.objects.get(pk=group_id).synthesis_status == SynthesisStatus.PROPOSED,
        logs=worker,
    )
    revision = SkillRevision.objects.get(source_groups=group_id)
    assert revision.origin == Origin.LIVE_LLM
    assert revision.llm_model == "loopback-model"
    assert revision.skill.slug == "iso-dates-for-order-search"
    assert len(llm_server.chat_requests()) == 1


def _reset_broker_connections() -> None:
    # New pools for the new URL (closing the old ones would break kombu's shared registry).
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


def test_an_ingest_while_the_broker_is_down_answers_202_and_the_sweep_enqueues_it_later(
    api, project, ingest_key, llm_server, real_broker, worker
):
    dead_port = procs.free_port()  # a port nobody listens on
    good_url = celery_app.conf.broker_url
    celery_app.conf.broker_url = f"redis://127.0.0.1:{dead_port}/0"
    _reset_broker_connections()
    try:
        started = time.monotonic()
        response = api.post(
            "/api/v1/incidents", factories.incident_payload("down-1"), key=ingest_key
        )
        assert time.monotonic() - started < 10
    finally:
        celery_app.conf.broker_url = good_url
        _reset_broker_connections()
    assert response.status_code == 202
    group = IncidentGroup.objects.get(pk=response.json()["group_id"])
    assert group.synthesis_status == SynthesisStatus.WAITING
    assert group.incidents.count() == 1

    time.sleep(1.0)
    assert llm_server.chat_requests() == []  # nothing reached the queue
    from skills.synthesis.tasks import sweep_waiting_groups

    sweep_waiting_groups.delay()

    _wait_for(
        lambda: IncidentGroup.objects.get(pk=group.pk).synthesis_status == SynthesisStatus.PROPOSED,
        logs=worker,
    )
    assert SkillRevision.objects.filter(source_groups=group).count() == 1
    assert len(llm_server.chat_requests()) == 1


def test_many_incidents_in_one_group_make_one_llm_call_in_the_worker(
    api, project, ingest_key, llm_server, real_broker, worker
):
    llm_server.default = Reply(content=ANSWER, delay=0.5)  # later incidents land mid-synthesis
    batch = {"items": [factories.incident_payload(f"b-{i}") for i in range(10)]}

    response = api.post("/api/v1/incidents/batch", batch, key=ingest_key)
    assert response.status_code in (200, 207), response.content
    for i in range(10, 15):
        api.post("/api/v1/incidents", factories.incident_payload(f"b-{i}"), key=ingest_key)

    group = IncidentGroup.objects.get(project=project)
    _wait_for(
        lambda: IncidentGroup.objects.get(pk=group.pk).synthesis_status == SynthesisStatus.PROPOSED,
        logs=worker,
    )
    time.sleep(1.0)
    assert IncidentGroup.objects.get(pk=group.pk).event_count == 15
    assert len(llm_server.chat_requests()) == 1
    assert SkillRevision.objects.count() == 1
    assert settings.CELERY_TASK_ALWAYS_EAGER  # the rest of the suite is untouched


def test_the_worker_keeps_its_database_connection_from_one_task_to_the_next(
    api, project, ingest_key, llm_server, real_broker, worker
):
    # Celery's Django fixup would close it after every task: each synthesis would then start
    # with a new PostgreSQL connection (a backend fork and authentication on the fast loop).
    def ingest(client_id: str, message: str) -> int:
        payload = factories.incident_payload(client_id)
        payload["error"] = {"type": "ToolArgumentError", "message": message}
        return api.post("/api/v1/incidents", payload, key=ingest_key).json()["group_id"]

    def proposed(group_id: int) -> bool:
        return IncidentGroup.objects.get(pk=group_id).synthesis_status == SynthesisStatus.PROPOSED

    first = ingest("keep-1", "search_orders: invalid value for 'since'")
    _wait_for(lambda: proposed(first), logs=worker)
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        (before_second,) = cursor.fetchone()

    answer = json.loads(ANSWER)
    answer["skill"].update(slug="currency-codes-for-refunds", name="Currency codes for refunds")
    answer["skill"]["instructions"] = "Pass ISO 4217 currency codes (EUR, USD) to create_refund."
    # The LLM takes its time, so the second task can be looked at while it runs.
    llm_server.enqueue(Reply(content=json.dumps(answer), delay=1.5))
    second = ingest("keep-2", "create_refund: unknown currency code")
    _wait_for(lambda: len(llm_server.chat_requests()) == 2, logs=worker)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND backend_start > %s",
            [before_second],
        )
        (opened_since,) = cursor.fetchone()
    _wait_for(lambda: proposed(second), logs=worker)

    assert opened_since == 0, "the second task opened a new database connection"


@pytest.mark.parametrize(("pool", "connections"), [("prefork", 2), ("threads", 1)])
def test_a_fresh_worker_connects_to_the_database_before_its_first_task(
    tmp_path, pool: str, connections: int
):
    # A worker that connected in its first task made that task, a proposal that a reviewer
    # waits for, pay for the connection (and the LLM client) after every restart. Nothing is
    # sent here: the connections must come from the start alone (prefork: one in each of the
    # two children; threads: the process's pool, which keeps one open).
    app_name = "metaclaw-test-fresh-worker"
    redis_process, redis_url = procs.start_redis(tmp_path)  # its own broker: no task reaches it
    llm = OpenAIServer(default=Reply(content=ANSWER), model="loopback-model").start()
    env = procs.process_env(redis_url, llm=llm, PGAPPNAME=app_name)
    process = procs.start_worker(env, tmp_path, "fresh", concurrency=2, beat=False, pool=pool)

    def backends() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                [app_name],
            )
            return cursor.fetchone()[0]

    try:
        procs.wait_ready(tmp_path / "fresh.log", time.monotonic() + 90)
        _wait_for(lambda: backends() >= connections, timeout=20, what="the connections")
        time.sleep(1.0)
        assert backends() >= connections, "a connection was closed again before any task"
        assert "Task " not in (tmp_path / "fresh.log").read_text()  # no task ran
        assert not llm.chat_requests()
    finally:
        procs.stop(process)
        llm.stop()
        redis_process.terminate()
        redis_process.wait(10)
        procs.wait_for_backends_to_end(app_name)
