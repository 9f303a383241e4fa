"""Reads of the approvals for pages: a project's notifications, an object's deliveries."""

from __future__ import annotations

import logging

from base.models import Project
from skills.approvals.models import (
    Notification,
)
from skills.library.models import SkillRevision

logger = logging.getLogger(__name__)


# --- Reads for pages ------------------------------------------------------------------------


def notifications_for_project(project: Project):
    return Notification.objects.filter(project=project).select_related("revision__skill", "version")


def notifications_for_object(*, revision: SkillRevision | None = None, version=None):
    """For the revision and version pages: how the approval requests were delivered."""
    if revision is not None:
        return Notification.objects.filter(revision=revision)
    return Notification.objects.filter(version=version)
