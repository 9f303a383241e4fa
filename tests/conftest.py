from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from metaclaw_site.celery import app as celery_app
from tests import factories


@pytest.fixture(autouse=True, scope="session")
def _clean_redis():
    """Counters from an earlier run must not rate-limit this one."""
    from base.counters import redis_client

    client = redis_client()
    if client is not None:
        client.flushdb()
    yield


@pytest.fixture(autouse=True)
def _clear_local_caches():
    from django.core.cache import cache

    from base.fast_lane import forget_blocked_addresses
    from base.queue import forget_broker_outage
    from base.services import api_key_cache_clear

    cache.clear()
    api_key_cache_clear()
    forget_blocked_addresses()
    forget_broker_outage()
    yield


ROOT = Path(__file__).resolve().parent.parent
# A statement that writes one of the incidents app's tables.
_INCIDENTS_WRITE = re.compile(
    r'^\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+"?(incidents_\w+)', re.IGNORECASE
)
_OWNERS = (str(ROOT / "incidents") + "/", str(ROOT / "tests") + "/")


def _writer_of(frame) -> str | None:
    """The file of the innermost frame of ours (the project's code or the tests)."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(str(ROOT) + "/") and "/.venv/" not in filename:
            return filename
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True)
def _only_incidents_services_write_its_tables():
    """ARCHITECTURE.md's rule, checked on every test: incidents, groups and trajectories are
    written only by the incidents app's own code (its services and ingestion); other apps ask
    it. Tests may set up rows directly."""
    from django.db import connection

    violations: list[str] = []

    def guard(execute, sql, params, many, context):
        match = _INCIDENTS_WRITE.match(sql)
        if match:
            writer = _writer_of(sys._getframe(1))
            if writer is not None and not writer.startswith(_OWNERS):
                violations.append(f"{writer} wrote {match.group(1)}: {sql[:120]}")
        return execute(sql, params, many, context)

    with connection.execute_wrapper(guard):
        yield
    assert not violations, "\n".join(violations)


@pytest.fixture
def project(db):
    return factories.make_project()


@pytest.fixture
def other_project(db):
    return factories.make_project(name="Other team")


@pytest.fixture
def ingest_key(project):
    return factories.make_key(project, scopes=["ingest"])


@pytest.fixture
def runtime_key(project):
    return factories.make_key(project, scopes=["runtime"])


@pytest.fixture
def admin_key(project):
    return factories.make_key(project, scopes=["ingest", "runtime", "admin"])


@pytest.fixture
def effectiveness_thresholds(settings):
    """Effectiveness judged over a week, from 100 turns and 8 incidents on a side."""
    settings.METACLAW = {
        **settings.METACLAW,
        "EFFECTIVENESS_WINDOW_DAYS": 7,
        "EFFECTIVENESS_MIN_TURNS": 100,
        "EFFECTIVENESS_MIN_INCIDENTS": 8,
    }


@pytest.fixture
def page_queries_do_not_grow(client, django_assert_num_queries):
    """``check(url, queries, add_rows)``: the page takes ``queries`` queries (once the session
    is warm), and as many again after ``add_rows()``; returns the last response."""

    def check(url: str, queries: int, add_rows):
        client.get(url)  # warm the session
        with django_assert_num_queries(queries):
            client.get(url)
        add_rows()
        with django_assert_num_queries(queries):
            return client.get(url)

    return check


@pytest.fixture
def real_broker():
    """Publish to Redis for real (the suite runs tasks eagerly otherwise)."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def api(client):
    """The Django test client with JSON helpers and a bearer key."""
    return factories.ApiClient(client)


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop running in the main
    thread for the rest of the session, which Django's async_to_sync then refuses."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
