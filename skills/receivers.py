"""The skills app's side of the fast loop's outbox: it listens to incidents' signals."""

from __future__ import annotations

import logging

from django.db.models.signals import post_save
from django.dispatch import receiver

from incidents import signals as incident_signals
from metaclaw_site.models import Project

logger = logging.getLogger(__name__)


@receiver(incident_signals.groups_await_synthesis)
def enqueue_synthesis(sender, group_ids: list[int], **kwargs) -> None:
    """Runs after commit. A broker outage is logged, not raised: the groups stay WAITING in the
    database and ``sweep_waiting_groups`` enqueues them later."""
    from .tasks import propose_skill

    for group_id in group_ids:
        try:
            propose_skill.delay(group_id)
        except Exception:  # noqa: BLE001 - the outbox row is the source of truth
            logger.warning(
                "Could not enqueue synthesis for group %s; the sweep will retry.", group_id
            )
            return


@receiver(post_save, sender=Project)
def create_initial_policy_version(sender, instance: Project, created: bool, **kwargs) -> None:
    """Every project has exactly one active policy version from its first moment (v1, empty)."""
    if created:
        from .services import policy_version_create_initial

        policy_version_create_initial(project=instance)
