"""The fast loop's Celery tasks: thin wrappers around ``skills.synthesis.services``.

Each task keeps the name it had before the synthesis moved into this package, so messages that
an older process queued (and the beat schedule) still find it."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from incidents import services as incident_services
from skills.synthesis import services as synthesis

logger = logging.getLogger(__name__)


SYNTHESIS_MAX_RETRIES = 4


def _synthesis_backoff(retries: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After if it gave one, else 5, 15, 45...
    capped at 5 minutes."""
    if retry_after is not None:
        return min(600.0, max(1.0, retry_after))
    return min(300.0, 5.0 * 3**retries)


@shared_task(
    bind=True,
    name="skills.tasks.propose_skill",
    acks_late=True,
    ignore_result=True,
    max_retries=SYNTHESIS_MAX_RETRIES,
)
def propose_skill(self, group_id: int) -> None:
    """Claim the group (WAITING → RUNNING, exactly one worker wins) and synthesise. Transient
    LLM errors retry with backoff; the final failure marks the group FAILED with the reason."""
    try:
        synthesis.group_synthesize(group_id=group_id)
    except synthesis.SynthesisRetryLater as exc:
        if self.request.retries >= self.max_retries:
            synthesis.group_synthesis_fail(
                group_id=group_id, reason=f"{exc} (gave up after {self.max_retries + 1} tries)"
            )
            return
        if self.request.is_eager:
            # Eager mode (tests, one-off commands) propagates Celery's Retry instead of
            # retrying; there is no broker to wait on, so retry inline.
            propose_skill.apply(args=[group_id], retries=self.request.retries + 1, throw=True)
            return
        countdown = _synthesis_backoff(self.request.retries, exc.retry_after)
        raise self.retry(countdown=countdown, exc=exc) from exc


@shared_task(name="skills.tasks.sweep_waiting_groups", acks_late=True, ignore_result=True)
def sweep_waiting_groups() -> int:
    """Re-enqueue groups that have waited too long (the broker was down, a message was lost),
    groups whose worker died, and groups held back by a daily budget that allows them again."""
    after = settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"]
    # A synthesis outlives the task's hard time limit only if its worker died.
    synthesis.groups_stale_running_release(
        older_than_seconds=max(after, settings.CELERY_TASK_TIME_LIMIT * 5)
    )
    synthesis.groups_budget_release()
    group_ids = incident_services.groups_waiting_for_synthesis(older_than_seconds=after)
    for group_id in group_ids:
        propose_skill.delay(group_id)
    if group_ids:
        logger.info("Sweep re-enqueued %d waiting group(s).", len(group_ids))
    return len(group_ids)
