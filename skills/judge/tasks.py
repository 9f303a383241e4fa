"""The judge's Celery tasks: thin wrappers around ``skills.judge.services``."""

from __future__ import annotations

import logging

from celery import shared_task

from base.queue import enqueue
from skills.judge import services
from skills.synthesis import llm

logger = logging.getLogger(__name__)

# Countdowns of the retries after a transient LLM error (the server's Retry-After wins when
# longer): all well inside services.SWEEP_AFTER_SECONDS.
RETRY_COUNTDOWNS = (15, 60, 180)


@shared_task(
    bind=True,
    name="skills.tasks.judge_revision",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=len(RETRY_COUNTDOWNS),
)
def judge_revision(self, revision_id: int) -> None:
    """Judge one revision (idempotent: the service claims it). A transient LLM error retries
    after a backoff; after the last one the revision's judge is "unavailable", with why."""
    try:
        services.revision_judge(revision_id=revision_id)
    except llm.LlmTransientError as exc:
        retries = self.request.retries
        # Eager mode (tests, one-off commands) has no broker to wait on.
        if self.request.is_eager or retries >= len(RETRY_COUNTDOWNS):
            services.revision_judge_fail(revision_id=revision_id, error=str(exc))
            return
        countdown = max(RETRY_COUNTDOWNS[retries], exc.retry_after or 0)
        raise self.retry(countdown=countdown, exc=exc) from exc


@shared_task(name="skills.tasks.sweep_pending_judges", acks_late=True, ignore_result=True)
def sweep_pending_judges() -> int:
    """Send again the revisions no queue holds (the broker was down, a worker was lost)."""
    ids = services.revisions_waiting_for_judge()
    for pk in ids:
        if not enqueue(services.TASK, pk):
            break
    if ids:
        logger.info("Sweep re-enqueued the judge of %d revision(s).", len(ids))
    return len(ids)
