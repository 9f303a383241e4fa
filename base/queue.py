"""How services hand work to Celery: by the task's name, after commit.

Services enqueue and tasks call services, so a tasks module imports its services and never the
reverse: a service names the task it wants (``"training.runs.tasks.training_run_execute"``) and the
Celery app's registry finds it. ``task.delay`` is what runs, so routing, eager mode in tests and
a test's patch of ``delay`` behave as before.

Work handed over this way is always recorded in the database first (a status, an outbox row):
when the broker is down the send is logged, not raised, and that row's periodic sweep sends it
again later.
"""

from __future__ import annotations

import logging
import threading
import time

import redis.exceptions
from celery import current_app
from django.db import transaction
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)

# After a send finds the broker unreachable, the sends of the next few seconds are not tried:
# each would wait CELERY_BROKER_CONNECTION_TIMEOUT for the same outage, in front of its request
# (on the fast lane, in front of every incident sharing its group commit: ingestion fell from
# 10/s to 3/s in tests/faults/test_redis_down_ingest.py), and the sweeps resend them anyway.
BROKER_RETRY_AFTER_SECONDS = 5.0
_BROKER_UNREACHABLE = (OperationalError, OSError, redis.exceptions.ConnectionError)
_broker_down_until = 0.0


_discovery = threading.Lock()


def _task(task_name: str):
    try:
        return current_app.tasks[task_name]
    except KeyError:
        # Outside a worker nothing has imported the apps' tasks modules yet: Celery's
        # autodiscovery runs on this signal, which only a worker's boot sends by itself (the
        # web processes send it at boot too). One thread at a time: Celery's autodiscovery
        # returns at once, having found nothing, to a second thread that calls it meanwhile.
        with _discovery:
            current_app.loader.import_default_modules()
        return current_app.tasks[task_name]


def enqueue(task_name: str, *args: object) -> bool:
    """Send the task now. False (and a warning) when the broker cannot be reached, or could not
    be a moment ago (``BROKER_RETRY_AFTER_SECONDS``)."""
    global _broker_down_until
    task = _task(task_name)  # a name that names no task is a bug: it raises
    if time.monotonic() < _broker_down_until:
        return False
    try:
        task.delay(*args)
    except Exception as exc:  # noqa: BLE001 - the database row is the source of truth; a sweep resends
        if isinstance(exc, _BROKER_UNREACHABLE):
            _broker_down_until = time.monotonic() + BROKER_RETRY_AFTER_SECONDS
        logger.warning("Could not enqueue %s%r; its sweep will send it later.", task_name, args)
        return False
    return True


def forget_broker_outage() -> None:
    """Try the next send whatever the last one found (tests, between scenarios)."""
    global _broker_down_until
    _broker_down_until = 0.0


def enqueue_on_commit(task_name: str, *calls: tuple[object, ...]) -> None:
    """Send the task once per argument tuple in ``calls`` when the current transaction commits
    (at once outside a transaction). A broker outage stops the rest: they share its fate, and the
    sweep finds every one of them."""

    def send() -> None:
        for args in calls:
            if not enqueue(task_name, *args):
                return

    if calls:
        transaction.on_commit(send)
