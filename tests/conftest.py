from __future__ import annotations

import pytest

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

    from base.services import api_key_cache_clear

    cache.clear()
    api_key_cache_clear()
    yield


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
def admin_key(project):
    return factories.make_key(project, scopes=["ingest", "runtime", "admin"])


@pytest.fixture
def api(client):
    """The Django test client with JSON helpers and a bearer key."""
    return factories.ApiClient(client)


def pytest_collection_modifyitems(config, items):
    """Browser tests run last: Playwright's sync API keeps an event loop running in the main
    thread for the rest of the session, which Django's async_to_sync then refuses."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
