"""Approval notifications and Slack clicks, delivered by Celery: thin wrappers around
``skills.approvals.notifications``, ``skills.approvals.slack`` and ``skills.approvals.delivery``.

Each task keeps the name it had before the approvals moved into this package, so messages that
an older process queued still find it."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from skills.approvals import delivery, notifications, slack

logger = logging.getLogger(__name__)

NOTIFY_MAX_RETRIES = 4  # 5 attempts in all, over about 5 minutes


def _notify_backoff(retries: int) -> int:
    """Seconds before the next attempt: 10, 20, 40, 80... capped at 10 minutes."""
    return min(600, 10 * 2**retries)


@shared_task(
    bind=True,
    name="skills.tasks.send_notification",
    acks_late=True,
    ignore_result=True,
    max_retries=NOTIFY_MAX_RETRIES,
)
def send_notification(self, notification_id: int) -> None:
    """Deliver one Notification. Retries with exponential backoff; the final failure is
    recorded on the row (status FAILED, last_error) and in the audit log."""
    notification = notifications.notification_claim(notification_id=notification_id)
    if notification is None:
        return
    try:
        delivery.deliver(notification)
    except delivery.DeliveryError as exc:
        final = isinstance(exc, delivery.PermanentDeliveryError) or (
            self.request.retries >= self.max_retries
        )
        notifications.notification_fail(
            notification_id=notification_id, error=str(exc), final=final
        )
        if final:
            logger.warning("Notification %s failed for good: %s", notification_id, exc)
            return
        retry = self.retry(countdown=_notify_backoff(self.request.retries), exc=exc, throw=False)
        if self.request.is_eager:  # tasks run inline (tests): Celery cannot schedule a retry
            retry.sig.apply(throw=True)
            return
        raise retry from exc
    notifications.notification_mark_sent(notification_id=notification_id)


@shared_task(name="skills.tasks.sweep_pending_notifications", acks_late=True, ignore_result=True)
def sweep_pending_notifications() -> int:
    """Enqueue notifications whose task message was lost (the broker was down at commit)."""
    ids = notifications.notifications_pending(
        older_than_seconds=settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"] * 4
    )
    for notification_id in ids:
        send_notification.delay(notification_id)
    return len(ids)


@shared_task(name="skills.tasks.process_slack_interaction", acks_late=True, ignore_result=True)
def process_slack_interaction(interaction_id: int) -> None:
    """The work behind a Slack button click, after the endpoint has acknowledged it. The
    claim inside ``slack_interaction_handle`` makes a redelivered message a no-op."""
    try:
        reply = slack.slack_interaction_handle(interaction_id=interaction_id)
    except Exception as exc:
        slack.slack_interaction_fail(interaction_id=interaction_id, error=repr(exc))
        raise
    if reply is not None and reply.response_url:
        try:
            delivery.slack_respond(reply.response_url, reply.body)
        except delivery.DeliveryError as exc:
            logger.warning("Slack reply for interaction %s failed: %s", interaction_id, exc)


@shared_task(name="skills.tasks.sweep_slack_interactions", acks_late=True, ignore_result=True)
def sweep_slack_interactions() -> int:
    """Finish Slack clicks left behind: enqueue RECEIVED ones whose task message was lost, and
    mark FAILED the ones a dead worker held or that are too old to answer."""
    ids = slack.slack_interactions_stuck(
        older_than_seconds=settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"] * 4
    )
    for interaction_id in ids:
        process_slack_interaction.delay(interaction_id)
    return len(ids)
