"""Fast-loop Celery tasks: thin wrappers around services."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from incidents import services as incident_services

logger = logging.getLogger(__name__)


@shared_task(acks_late=True, ignore_result=True)
def propose_skill(group_id: int) -> None:
    """Claim the group (WAITING → RUNNING, exactly one worker wins) and synthesise."""
    from . import synthesis

    synthesis.group_synthesize(group_id=group_id)


@shared_task(acks_late=True, ignore_result=True)
def sweep_waiting_groups() -> int:
    """Re-enqueue groups that have waited too long (the broker was down, a message was lost)."""
    group_ids = incident_services.groups_waiting_for_synthesis(
        older_than_seconds=settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"]
    )
    for group_id in group_ids:
        propose_skill.delay(group_id)
    if group_ids:
        logger.info("Sweep re-enqueued %d waiting group(s).", len(group_ids))
    return len(group_ids)
