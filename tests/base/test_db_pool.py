"""PostgreSQL connections come from a pool per process.

Under ASGI every request runs its sync view in a thread of its own; with a persistent
connection per thread, a busy process opened connections until PostgreSQL refused more."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings
from django.db import connection, connections

pytestmark = pytest.mark.django_db


def test_the_database_is_pooled_and_connections_are_not_kept_per_thread():
    db = settings.DATABASES["default"]
    assert db["OPTIONS"]["pool"]["max_size"] >= db["OPTIONS"]["pool"]["min_size"] >= 1
    assert db["CONN_MAX_AGE"] == 0  # pooling requires it: the pool keeps them instead


def test_many_request_threads_share_at_most_the_pools_connections():
    max_size = settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"]
    threads = max_size * 3
    together = threading.Barrier(threads, timeout=30)

    def request() -> int:
        # What a request thread does: query, and close at the end (request_finished).
        try:
            together.wait()
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                (pid,) = cursor.fetchone()
            return pid
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=threads) as executor:
        pids = list(executor.map(lambda _: request(), range(threads)))

    assert len(pids) == threads
    assert len(set(pids)) <= max_size
