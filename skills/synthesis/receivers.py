"""The fast loop's side of incidents' signals: groups that wait for a skill are handed to a
worker, a new incident in a group whose skill is live marks a regression, and merged groups'
proposals follow the group they joined."""

from __future__ import annotations

from django.dispatch import receiver

from base.models import Project
from base.queue import enqueue
from incidents import signals as incident_signals
from skills.library.services import revisions_follow_merged_groups
from skills.synthesis.regressions import skill_regressions_detect


@receiver(incident_signals.groups_await_synthesis)
def enqueue_synthesis(sender, group_ids: list[int], **kwargs) -> None:
    """Runs after commit. A broker outage is logged, not raised: the groups stay WAITING in the
    database and ``sweep_waiting_groups`` enqueues them later."""
    for group_id in group_ids:
        if not enqueue("skills.tasks.propose_skill", group_id):
            return


@receiver(incident_signals.incidents_ingested)
def detect_skill_regressions(
    sender, project: Project, group_ids: list[int], incident_ids: list, **kwargs
) -> None:
    """Inside the ingest transaction: a new incident in a group whose skill is in the active
    policy marks the group regressed and asks for a revision of that skill."""
    skill_regressions_detect(project=project, group_ids=group_ids, incident_ids=incident_ids)


@receiver(incident_signals.groups_merged)
def proposals_follow_merged_groups(
    sender, project: Project, target_id: int, source_ids: list[int], **kwargs
) -> None:
    """Inside the merging transaction: a merged group's proposals show on the group it joined."""
    revisions_follow_merged_groups(target_id=target_id, source_ids=source_ids)
