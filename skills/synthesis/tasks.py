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


@shared_task(
    bind=True,
    name="skills.tasks.propose_skill",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    # Bounded by time, not by count: the service fails the group once transient errors have
    # lasted METACLAW["SYNTHESIS_GIVE_UP_SECONDS"].
    max_retries=None,
)
def propose_skill(self, group_id: int, retrying_since: float | None = None) -> None:
    """Claim the group (WAITING and due → RUNNING, exactly one worker wins) and synthesise.
    Transient errors retry after the backoff the service set (the group's due time); the
    service records the final failure with its reason."""
    try:
        synthesis.group_synthesize(
            group_id=group_id, retrying_since=retrying_since, backoff=not self.request.is_eager
        )
    except synthesis.SynthesisRetryLater as exc:
        if self.request.is_eager:
            # Eager mode (tests, one-off commands) propagates Celery's Retry instead of
            # retrying; there is no broker to wait on, so retry inline.
            propose_skill.apply(
                args=[group_id],
                kwargs={"retrying_since": exc.since},
                retries=self.request.retries + 1,
                throw=True,
            )
            return
        raise self.retry(
            args=[group_id],
            kwargs={"retrying_since": exc.since},
            countdown=exc.countdown,
            exc=exc,
        ) from exc


@shared_task(name="skills.tasks.sweep_waiting_groups", acks_late=True, ignore_result=True)
def sweep_waiting_groups() -> int:
    """Re-enqueue groups that no queue holds: WAITING past their due time (the broker was down,
    a message was lost), RUNNING ones whose worker stopped renewing the lease, and groups held
    back by a daily budget that allows them again. A group in a backoff is not due yet."""
    after = settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"]
    synthesis.groups_stale_running_release(older_than_seconds=synthesis.lease_seconds())
    synthesis.groups_budget_release()
    group_ids = incident_services.groups_waiting_for_synthesis(older_than_seconds=after)
    for group_id in group_ids:
        propose_skill.delay(group_id)
    if group_ids:
        logger.info("Sweep re-enqueued %d waiting group(s).", len(group_ids))
    return len(group_ids)
