"""The lease on a claimed group, renewed while this process synthesises it.

A claim stamps the group (``synthesis_claimed_at``); a RUNNING group whose stamp is older than
``lease_seconds()`` lost its worker (SIGKILL, a lost machine), and the sweep puts it back in the
queue within about a minute instead of waiting out the task's time limits. While a synthesis
runs, one thread per process renews the stamps of every group this process holds, in one
UPDATE every quarter of the lease. One thread for the process, not one per synthesis: starting
a thread (and its database connection) for each synthesis cost the fast loop CPU on every
proposal, and a ``-P threads`` worker with many syntheses waiting on a hosted LLM renews them
all in one statement.

May import: ``incidents`` (its services write the stamp) and Django.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import DatabaseError, connections, transaction

from incidents import services as incident_services

logger = logging.getLogger(__name__)


MIN_RENEW_INTERVAL_SECONDS = 0.05


def lease_seconds() -> float:
    """A RUNNING group whose claim has not been renewed for this long lost its worker."""
    return float(settings.METACLAW.get("SYNTHESIS_LEASE_SECONDS", 45))


def _interval() -> float:
    # Read each time: a setting changed meanwhile (a test's) takes effect. Never a busy loop,
    # even with a lease of 0 s.
    return max(MIN_RENEW_INTERVAL_SECONDS, lease_seconds() / 4)


class _Renewer:
    """The groups this process holds, and the thread that renews their leases."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[int] = Counter()
        self._thread: threading.Thread | None = None
        # Set by ``hold``: the thread then takes the lease's length again, so that a shorter
        # one (set since it last slept) is renewed in time.
        self._woken = threading.Event()

    def hold(self, group_id: int) -> None:
        with self._lock:
            self._held[group_id] += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="synthesis-leases", daemon=True
                )
                self._thread.start()
        self._woken.set()

    def release(self, group_id: int) -> None:
        with self._lock:
            self._held[group_id] -= 1
            if self._held[group_id] <= 0:
                del self._held[group_id]

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def _run(self) -> None:
        due = time.monotonic() + _interval()
        while True:
            self._woken.wait(timeout=max(0.0, due - time.monotonic()))
            if self._woken.is_set():
                self._woken.clear()
                due = min(due, time.monotonic() + _interval())
            if time.monotonic() < due:
                continue
            due = time.monotonic() + _interval()
            group_ids = self.held()
            if not group_ids:
                continue
            try:
                incident_services.groups_synthesis_heartbeat(group_ids=group_ids)
            except DatabaseError:
                logger.warning("Could not renew the leases of groups %s.", group_ids)
            except Exception:  # noqa: BLE001 - the one renewer of the process must live on
                logger.exception("Renewing the leases of groups %s failed.", group_ids)
            finally:
                # Hand this thread's connection back (to the pool, or closed): it renews a few
                # times a minute and must not keep one of the pool's connections meanwhile.
                connections.close_all()

    def after_fork_in_child(self) -> None:
        # A forked child (Celery's prefork pool) has none of its parent's threads: it starts
        # its own on its first synthesis, and holds none of the parent's groups.
        self._lock = threading.Lock()
        self._held = Counter()
        self._thread = None
        self._woken = threading.Event()


_renewer = _Renewer()
os.register_at_fork(after_in_child=_renewer.after_fork_in_child)


@contextmanager
def lease_kept(group_id: int) -> Iterator[None]:
    """Renew the claim's lease on ``group_id`` while the block runs. Not inside a transaction
    (eager tasks in tests): the renewal would wait on the caller's row lock."""
    if transaction.get_connection().in_atomic_block:
        yield
        return
    _renewer.hold(group_id)
    try:
        yield
    finally:
        _renewer.release(group_id)
