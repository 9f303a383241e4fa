"""Recording how a synthesis ended: the group's outcome (only while this worker still holds it)
and its audit event."""

from __future__ import annotations

import logging
from typing import Any

from base.models import Project
from base.services import audit_record
from incidents import services as incident_services
from incidents.models import IncidentGroup
from skills.library.models import SkillRevision

logger = logging.getLogger(__name__)


class SynthesisClaimLost(Exception):
    """The group was no longer RUNNING when this worker came to record its outcome (a sweep
    released it, another worker has it): the outcome is rolled back and nothing is recorded."""


def finish(
    group: IncidentGroup, status: str, reason: str, *, revision: SkillRevision | None = None
) -> bool:
    """Record the outcome (RUNNING → ``status``); False when the group was no longer RUNNING."""
    if incident_services.group_synthesis_finish(group_id=group.pk, status=status, error=reason):
        audit_outcome(group.pk, status, reason, revision=revision, project=group.project)
        return True
    return False


def audit_outcome(
    group_id: int,
    status: str,
    reason: str,
    *,
    revision: SkillRevision | None = None,
    project: Project | None = None,
) -> None:
    group = IncidentGroup(pk=group_id)
    if project is None:
        project = Project.objects.filter(incident_groups__pk=group_id).first()
    after: dict[str, Any] = {"synthesis_status": status}
    if revision is not None:
        after["revision_id"] = revision.pk
    audit_record(
        action=f"incident_group.synthesis_{status}",
        project=project,
        actor_label="fast-loop",
        obj=group,
        after=after,
        message=reason[:2000],
    )
