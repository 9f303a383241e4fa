"""The skills app's side of the fast loop's outbox: it listens to incidents' signals."""

from __future__ import annotations

import logging

from django.db.models.signals import post_save
from django.dispatch import receiver

from base.models import Project
from base.queue import enqueue
from incidents import signals as incident_signals

logger = logging.getLogger(__name__)


@receiver(incident_signals.groups_await_synthesis)
def enqueue_synthesis(sender, group_ids: list[int], **kwargs) -> None:
    """Runs after commit. A broker outage is logged, not raised: the groups stay WAITING in the
    database and ``sweep_waiting_groups`` enqueues them later."""
    for group_id in group_ids:
        if not enqueue("skills.tasks.propose_skill", group_id):
            return


@receiver(post_save, sender=Project)
def create_initial_policy_version(sender, instance: Project, created: bool, **kwargs) -> None:
    """Every project has exactly one active policy version from its first moment (v1, empty)."""
    if created:
        from .services import policy_version_create_initial

        policy_version_create_initial(project=instance)


# --- Approval notifications (skills.approvals) ---------------------------------------------
# These run after commit (the services send the signals from on_commit). A failure here must
# not undo or hide the decision, so it is logged.

from . import signals as skill_signals  # noqa: E402


@receiver(skill_signals.revision_proposed)
def notify_reviewers_of_revision(sender, revision, **kwargs) -> None:
    from .approvals import approval_notify

    try:
        approval_notify(revision=revision)
    except Exception:  # noqa: BLE001
        logger.exception("Could not notify reviewers of revision %s.", revision.pk)


@receiver(skill_signals.version_candidate_created)
def notify_admins_of_candidate(sender, version, **kwargs) -> None:
    from .approvals import approval_notify

    try:
        approval_notify(version=version)
    except Exception:  # noqa: BLE001
        logger.exception("Could not notify admins of candidate version %s.", version.pk)


@receiver(skill_signals.revision_decided)
def notify_channels_of_revision_decision(sender, revision, outcome: str, **kwargs) -> None:
    from .approvals import approval_decision_notify

    try:
        approval_decision_notify(revision=revision)
    except Exception:  # noqa: BLE001
        logger.exception("Could not announce the decision on revision %s.", revision.pk)


@receiver(skill_signals.active_version_changed)
def notify_channels_of_promotion(sender, project_id: int, version_id: int, **kwargs) -> None:
    from .approvals import approval_decision_notify
    from .models import PolicyVersion

    version = PolicyVersion.objects.filter(pk=version_id).first()
    if version is None or not version.notifications.exists():
        return
    try:
        approval_decision_notify(version=version)
    except Exception:  # noqa: BLE001
        logger.exception("Could not announce the promotion of version %s.", version_id)


@receiver(incident_signals.incidents_ingested)
def detect_skill_regressions(
    sender, project: Project, group_ids: list[int], incident_ids: list, **kwargs
) -> None:
    """Inside the ingest transaction: a new incident in a group whose skill is in the active
    policy marks the group regressed and asks for a revision of that skill."""
    from .synthesis import skill_regressions_detect

    skill_regressions_detect(project=project, group_ids=group_ids, incident_ids=incident_ids)


@receiver(skill_signals.active_version_changed)
def invalidate_runtime_policy(sender, project_id: int, version_id: int, **kwargs) -> None:
    """Runs after commit. Agents see the new active version at once from this process, and
    within a second from every other web process (the generation counter in Redis)."""
    from .runtime import policy_cache_invalidate

    policy_cache_invalidate(project_id=project_id)
