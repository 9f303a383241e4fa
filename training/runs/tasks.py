"""Slow-loop Celery tasks: thin wrappers around the runs' and the policy's services.

``training_run_execute`` is routed to the "slow" queue (``CELERY_TASK_ROUTES``: names starting
``training.tasks.training_run_``), so a long run never delays the fast loop. Each task keeps the
name it had before the slow loop moved into packages, so messages that an older process queued
(and the beat schedule) still find it.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.utils import timezone

from training.policy import services as policy_services
from training.policy.models import IdleWindowPolicy
from training.runs import execute as runs_execute
from training.runs import services as run_services

logger = logging.getLogger(__name__)

# A run trains in slices: it pauses itself (saving state) a little before the soft limit and
# the next idle check resumes it, so a worker is never killed mid-checkpoint.
RUN_SOFT_TIME_LIMIT = int(os.environ.get("METACLAW_TRAINING_SLICE_SECONDS", 3 * 3600))
RUN_PAUSE_MARGIN = 120
CALENDAR_REFRESH = timedelta(hours=1)


@shared_task(
    name="training.tasks.training_run_execute",
    acks_late=True,
    ignore_result=True,
    soft_time_limit=RUN_SOFT_TIME_LIMIT,
    time_limit=RUN_SOFT_TIME_LIMIT + 600,
)
def training_run_execute(run_id: int) -> None:
    """Claim the queued run (QUEUED → PREPARING, exactly one worker wins) and run it. Backend
    clients are created here, inside the worker process."""
    deadline = time.monotonic() + max(60, RUN_SOFT_TIME_LIMIT - RUN_PAUSE_MARGIN)
    try:
        runs_execute.training_run_execute(run_id=run_id, deadline=deadline)
    except SoftTimeLimitExceeded:
        run_services.training_run_fail(
            run_id=run_id, error="The worker's time limit ran out before the run could pause."
        )


@shared_task(name="training.tasks.check_idle_windows", acks_late=True, ignore_result=True)
def check_idle_windows() -> int:
    """Every minute (beat): mark stale runs, refresh calendar feeds hourly, and let each project
    with automatic training resume or start a run when it is idle and ready."""
    run_services.training_runs_mark_stale()
    started = 0
    now = timezone.now()
    policies = IdleWindowPolicy.objects.filter(auto_train=True).select_related("project")
    for policy in policies:
        if policy.ical_url and (
            policy.ical_fetched_at is None or now - policy.ical_fetched_at > CALENDAR_REFRESH
        ):
            policy_services.idle_policy_calendar_refresh(policy=policy)
        try:
            if runs_execute.training_schedule_tick(project=policy.project, now=now) is not None:
                started += 1
        except Exception:  # noqa: BLE001 - one project's trouble must not stop the others
            logger.exception("Idle check failed for project %s.", policy.project_id)
    return started
