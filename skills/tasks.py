"""Fast-loop Celery tasks: thin wrappers around services."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from incidents import services as incident_services

logger = logging.getLogger(__name__)


SYNTHESIS_MAX_RETRIES = 4


def _synthesis_backoff(retries: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After if it gave one, else 5, 15, 45...
    capped at 5 minutes."""
    if retry_after is not None:
        return min(600.0, max(1.0, retry_after))
    return min(300.0, 5.0 * 3**retries)


@shared_task(bind=True, acks_late=True, ignore_result=True, max_retries=SYNTHESIS_MAX_RETRIES)
def propose_skill(self, group_id: int) -> None:
    """Claim the group (WAITING → RUNNING, exactly one worker wins) and synthesise. Transient
    LLM errors retry with backoff; the final failure marks the group FAILED with the reason."""
    from . import synthesis

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


@shared_task(acks_late=True, ignore_result=True)
def sweep_waiting_groups() -> int:
    """Re-enqueue groups that have waited too long (the broker was down, a message was lost),
    groups whose worker died, and groups held back by a daily budget that allows them again."""
    from . import synthesis

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


# --- Approval notifications and Slack interactions (skills.approvals, skills.notify) ---------

NOTIFY_MAX_RETRIES = 4  # 5 attempts in all, over about 5 minutes


def _notify_backoff(retries: int) -> int:
    """Seconds before the next attempt: 10, 20, 40, 80... capped at 10 minutes."""
    return min(600, 10 * 2**retries)


@shared_task(bind=True, acks_late=True, ignore_result=True, max_retries=NOTIFY_MAX_RETRIES)
def send_notification(self, notification_id: int) -> None:
    """Deliver one Notification. Retries with exponential backoff; the final failure is
    recorded on the row (status FAILED, last_error) and in the audit log."""
    from . import approvals, notify

    notification = approvals.notification_claim(notification_id=notification_id)
    if notification is None:
        return
    try:
        notify.deliver(notification)
    except notify.DeliveryError as exc:
        final = isinstance(exc, notify.PermanentDeliveryError) or (
            self.request.retries >= self.max_retries
        )
        approvals.notification_fail(notification_id=notification_id, error=str(exc), final=final)
        if final:
            logger.warning("Notification %s failed for good: %s", notification_id, exc)
            return
        retry = self.retry(countdown=_notify_backoff(self.request.retries), exc=exc, throw=False)
        if self.request.is_eager:  # tasks run inline (tests): Celery cannot schedule a retry
            retry.sig.apply(throw=True)
            return
        raise retry from exc
    approvals.notification_mark_sent(notification_id=notification_id)


@shared_task(acks_late=True, ignore_result=True)
def sweep_pending_notifications() -> int:
    """Enqueue notifications whose task message was lost (the broker was down at commit)."""
    from . import approvals

    ids = approvals.notifications_pending(
        older_than_seconds=settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"] * 4
    )
    for notification_id in ids:
        send_notification.delay(notification_id)
    return len(ids)


@shared_task(acks_late=True, ignore_result=True)
def process_slack_interaction(interaction_id: int) -> None:
    """The work behind a Slack button click, after the endpoint has acknowledged it. The
    claim inside ``slack_interaction_handle`` makes a redelivered message a no-op."""
    from . import approvals, notify

    try:
        reply = approvals.slack_interaction_handle(interaction_id=interaction_id)
    except Exception as exc:
        approvals.slack_interaction_fail(interaction_id=interaction_id, error=repr(exc))
        raise
    if reply is not None and reply.response_url:
        try:
            notify.slack_respond(reply.response_url, reply.body)
        except notify.DeliveryError as exc:
            logger.warning("Slack reply for interaction %s failed: %s", interaction_id, exc)


@shared_task(acks_late=True, ignore_result=True)
def sweep_slack_interactions() -> int:
    """Finish Slack clicks left behind: enqueue RECEIVED ones whose task message was lost, and
    mark FAILED the ones a dead worker held or that are too old to answer."""
    from . import approvals

    ids = approvals.slack_interactions_stuck(
        older_than_seconds=settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"] * 4
    )
    for interaction_id in ids:
        process_slack_interaction.delay(interaction_id)
    return len(ids)
