"""The Celery app. Task modules of every app are discovered here (the composition root)."""

from __future__ import annotations

import gc
import logging
import os

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_init, worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")

logger = logging.getLogger(__name__)

app = Celery("metaclaw")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Capabilities that keep their tasks beside them, inside an app.
app.autodiscover_tasks(
    [
        "skills.synthesis",
        "skills.approvals",
        "skills.effectiveness",
        "skills.gate",
        "skills.judge",
        "skills.canary",
        "training.runs",
    ]
)

# Celery's Django fixup closes every database connection before and after every task unless
# this is set: each fast-loop task then paid for a new PostgreSQL connection (a backend fork and
# authentication, several milliseconds of both processes' CPU). Connections are kept instead, and
# Django's own rule applies between tasks (``close_old_connections``: CONN_MAX_AGE and
# CONN_HEALTH_CHECKS), exactly as between two web requests.
app.conf.CELERY_DB_REUSE_MAX = 10**9


@task_prerun.connect
@task_postrun.connect
def _close_old_connections(sender=None, task=None, **kwargs) -> None:
    if task is not None and getattr(task.request, "is_eager", False):
        return  # an eager task runs inside its caller's request or transaction
    from django.db import close_old_connections

    close_old_connections()


app.conf.beat_schedule = {
    "check-canaries": {"task": "skills.tasks.check_canaries", "schedule": 60.0},
    "sweep-waiting-groups": {"task": "skills.tasks.sweep_waiting_groups", "schedule": 15.0},
    "check-idle-windows": {"task": "training.tasks.check_idle_windows", "schedule": 60.0},
    "sweep-slack-interactions": {"task": "skills.tasks.sweep_slack_interactions", "schedule": 60.0},
    "check-effectiveness": {"task": "skills.tasks.check_effectiveness", "schedule": 3600.0},
    "sweep-pending-judges": {"task": "skills.tasks.sweep_pending_judges", "schedule": 60.0},
    "sweep-pending-notifications": {
        "task": "skills.tasks.sweep_pending_notifications",
        "schedule": 60.0,
    },
    "ensure-incident-partitions": {
        "task": "incidents.tasks.ensure_incident_partitions",
        "schedule": 6 * 3600.0,
    },
}


@worker_init.connect
def _load_before_the_pool_forks(**kwargs) -> None:
    """Import the URL configuration (tasks build approval links), the fast loop's modules and
    the LLM SDK's lazy parts, and load the embedding model and the PII detector, once, in the
    worker's main process:
    the pool's children fork with all of it in memory. Loaded lazily, each child paid for them
    (about 1 s here) in its first task, a fast-loop proposal among them."""
    from django.urls import get_resolver

    import skills.approvals.notifications
    import skills.synthesis.services  # noqa: F401
    from base.pii import get_detector
    from skills.library.embeddings import get_embedder
    from skills.synthesis import llm

    get_resolver().url_patterns  # noqa: B018 - the access is the point: it imports them
    llm.preload()
    get_embedder()
    # The PII detector (Presidio + spaCy, 1-9 s to load): every synthesis redacts its evidence
    # with it, so a child that loaded it itself kept its first proposals waiting that long.
    detector = get_detector()
    if detector is not None:
        # spaCy and Presidio finish setting up on their first analysis: once, here, rather
        # than in each child's first proposal (about 25 ms there, measured).
        detector.find(["Warm-up: Jane Doe called from +1 202 555 0143 on 3 May 1990."])
    pool = getattr(kwargs.get("sender"), "pool_cls", None)
    if pool is not None and not getattr(pool, "__module__", "").endswith(".prefork"):
        # Threads (or solo) run the tasks in this process, which never forks: connect now.
        _connect_before_the_first_task()
    else:
        # In each child. Connected now, not at import: receivers run in the order they were
        # connected, and Celery's Django fixup connects its own just before this function,
        # which closes every database connection and pool a child inherited. Run before it,
        # it closed ours too.
        worker_process_init.connect(
            _connect_before_the_first_task, weak=False, dispatch_uid="metaclaw-connect-first"
        )
    gc.collect()
    gc.freeze()  # and keep what boot loaded out of the children's garbage collections


def _connect_before_the_first_task(**kwargs) -> None:
    """Before the first task (in each prefork child, or in a worker of threads): open the
    database pool and build the LLM client (TLS context, connection pool), which nothing may do
    before a fork. ``benchmarks/worker_start.py`` on a 2-core machine: a fresh worker's first
    proposal took 213 ms against 75 ms for its later ones; with this and the warm-up analysis
    above, 134 against 63 ms (what remains is the new database backend's first use of each
    table, the cache's first Redis connection and the interpreter's first run of each path).
    A failure here is logged and left to the first task, which meets it again and handles it as
    it always has: a child must start (Celery kills one that takes more than a few seconds
    here), so nothing here waits long or raises."""
    from django.db import connection

    from skills.synthesis import llm

    try:
        # Only from a pool, whose timeout (``METACLAW_DB_POOL_TIMEOUT``) bounds the wait; a
        # plain connection to an unreachable host could block past Celery's patience.
        if getattr(connection, "pool", None) is not None:
            connection.ensure_connection()
            connection.close()  # back to the pool, ready for the first task
    except Exception:  # noqa: BLE001 - the first task tries again and reports it
        logger.warning("Could not open a database connection before the first task.", exc_info=True)
    try:
        llm.client_prepare()
    except Exception:  # noqa: BLE001 - likewise
        logger.warning("Could not build the LLM client before the first task.", exc_info=True)
