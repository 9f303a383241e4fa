"""The approvals' side of the skills app's signals: reviewers and channels hear of proposals,
candidates and decisions. These run after commit (the services send the signals from
on_commit); a failure here must not undo or hide the decision, so it is logged."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from skills import signals as skill_signals
from skills.approvals.digest import approval_import_notify
from skills.approvals.notifications import approval_decision_notify, approval_notify

logger = logging.getLogger(__name__)
# These run after commit (the services send the signals from on_commit). A failure here must
# not undo or hide the decision, so it is logged.


@receiver(skill_signals.revision_proposed)
def notify_reviewers_of_revision(sender, revision, **kwargs) -> None:
    try:
        approval_notify(revision=revision)
    except Exception:  # noqa: BLE001
        logger.exception("Could not notify reviewers of revision %s.", revision.pk)


@receiver(skill_signals.revision_judged)
def notify_reviewers_of_a_judge_flag(sender, revision, flagged: bool, **kwargs) -> None:
    """The LLM judge failed a proposal after it was announced: the reviewers hear again, with
    the judge's findings and no approve link (links already sent are refused on use)."""
    if not flagged:
        return
    try:
        approval_notify(revision=revision)
    except Exception:  # noqa: BLE001
        logger.exception("Could not notify reviewers of the judge's flag on %s.", revision.pk)


@receiver(skill_signals.revisions_imported)
def notify_reviewers_of_import(
    sender, project_id: int, revision_ids: list[int], actor_label: str = "", **kwargs
) -> None:
    try:
        approval_import_notify(
            project_id=project_id, revision_ids=revision_ids, actor_label=actor_label
        )
    except Exception:  # noqa: BLE001
        logger.exception("Could not notify reviewers of %s imported revisions.", len(revision_ids))


@receiver(skill_signals.version_candidate_created)
def notify_admins_of_candidate(sender, version, **kwargs) -> None:
    try:
        approval_notify(version=version)
    except Exception:  # noqa: BLE001
        logger.exception("Could not notify admins of candidate version %s.", version.pk)


@receiver(skill_signals.revision_decided)
def notify_channels_of_revision_decision(sender, revision, outcome: str, **kwargs) -> None:
    try:
        approval_decision_notify(revision=revision)
    except Exception:  # noqa: BLE001
        logger.exception("Could not announce the decision on revision %s.", revision.pk)


@receiver(skill_signals.active_version_changed)
def notify_channels_of_promotion(sender, project_id: int, version_id: int, **kwargs) -> None:
    from skills.versions.models import PolicyVersion

    version = PolicyVersion.objects.filter(pk=version_id).first()
    if version is None or not version.notifications.exists():
        return
    try:
        approval_decision_notify(version=version)
    except Exception:  # noqa: BLE001
        logger.exception("Could not announce the promotion of version %s.", version_id)
