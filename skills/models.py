"""The skills app's models, for Django's registry: each is defined beside the capability that
owns it, and code imports it from there (``skills.library.models``, ...)."""

from skills.approvals.models import (
    ApprovalAction,
    ApprovalRequest,
    InteractionStatus,
    Notification,
    NotificationChannel,
    NotificationKind,
    NotificationStatus,
    SlackInteraction,
)
from skills.canary.models import CanaryOutcome, CanaryRelease
from skills.gate.models import GateMode, GateStatus, ReplayGate, ReplayPair, Verdict
from skills.library.models import Author, Category, Origin, RevisionStatus, Skill, SkillRevision
from skills.synthesis.models import LlmUsage
from skills.versions.models import PolicyVersion, Release, ReleaseKind, VersionStatus

__all__ = [
    "CanaryOutcome",
    "CanaryRelease",
    "GateMode",
    "GateStatus",
    "ReplayGate",
    "ReplayPair",
    "Verdict",
    "ApprovalAction",
    "ApprovalRequest",
    "Author",
    "Category",
    "InteractionStatus",
    "LlmUsage",
    "Notification",
    "NotificationChannel",
    "NotificationKind",
    "NotificationStatus",
    "Origin",
    "PolicyVersion",
    "Release",
    "ReleaseKind",
    "RevisionStatus",
    "Skill",
    "SkillRevision",
    "SlackInteraction",
    "VersionStatus",
]
