"""Tenant scoping for the browser: which projects a user may see, with which role."""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import QuerySet

from base import crypto
from base.errors import NotFound, PermissionDenied
from base.models import ApiKey, AuditEvent, Membership, Project, Role
from base.querysets import narrowed

logger = logging.getLogger(__name__)


def projects_for_user(user: Any) -> QuerySet[Project]:
    if not getattr(user, "is_authenticated", False):
        return Project.objects.none()
    if user.is_superuser:
        return Project.objects.all()
    return Project.objects.filter(memberships__user=user)


def membership_for(*, user: Any, project: Project) -> Membership | None:
    """The user's membership; superusers act as admins of every project."""
    if not getattr(user, "is_authenticated", False):
        return None
    membership = Membership.objects.filter(user=user, project=project).first()
    if membership is None and user.is_superuser:
        return Membership(user=user, project=project, role=Role.ADMIN)
    return membership


def project_for_user(
    *, user: Any, slug: str, role: str = Role.VIEWER
) -> tuple[Project, Membership]:
    """The project ``slug`` if the user has at least ``role`` in it. An unknown project and a
    project the user is not a member of look the same (NotFound), so slugs do not leak."""
    project = Project.objects.filter(slug=slug).first()
    membership = membership_for(user=user, project=project) if project else None
    if project is None or membership is None:
        raise NotFound("No such project.")
    if not membership.has_role(role):
        raise PermissionDenied(f"This needs the {role} role in {project.name}.")
    return project, membership


def api_keys_for_project(project: Project) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(project=project).select_related("created_by")


def audit_events_for_project(project: Project) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(project=project).select_related("actor")


def memberships_for_project(project: Project) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(project=project).select_related("user").order_by("user__username")
    )


def audit_events_filtered(
    project: Project,
    *,
    action: str = "",
    actor: str = "",
    object_type: str = "",
    since: Any = None,
    until: Any = None,
) -> QuerySet[AuditEvent]:
    """The project's audit events matching every given filter (empty ones are ignored).
    ``action`` ending in "." matches a family ("api_key." = every API key action)."""
    qs = audit_events_for_project(project)
    if action:
        qs = (
            qs.filter(action__startswith=action)
            if action.endswith(".")
            else qs.filter(action=action)
        )
    return narrowed(
        qs,
        actor_label__icontains=actor,
        object_type=object_type,
        created_at__gte=since,
        created_at__lt=until,
    )


AUDIT_CHOICES_WINDOW = 2000


def audit_filter_choices(project: Project) -> tuple[list[str], list[str]]:
    """The actions and object types for the filter menus: those of the project's latest
    ``AUDIT_CHOICES_WINDOW`` events (one index range scan, the same cost however long the log
    grows), plus any value already selected."""
    pairs = (
        AuditEvent.objects.filter(project=project)
        .order_by("-created_at", "-id")
        .values_list("action", "object_type")[:AUDIT_CHOICES_WINDOW]
    )
    actions: set[str] = set()
    object_types: set[str] = set()
    for action, object_type in pairs:
        actions.add(action)
        if object_type:
            object_types.add(object_type)
    return sorted(actions), sorted(object_types)


# --- Project settings and onboarding ---------------------------------------------------------


def project_upstream_api_key(project: Project) -> str:
    """The project's upstream API key in plaintext, or "": the one reader of the encrypted
    ``Project.upstream_api_key`` (``base.crypto``). A key that no longer decrypts (SECRET_KEY
    changed without a fallback) counts as none, so the upstream answers 401 and the settings
    page says to type it again, instead of every proxied request failing here."""
    try:
        return crypto.decrypt(project.upstream_api_key or "")
    except crypto.SecretUnreadable:
        logger.error("Project %s: the stored upstream API key cannot be decrypted.", project.pk)
        return ""


def project_upstream_api_key_state(project: Project) -> str:
    """What the settings page shows of the write-only key: "set", "not set" or "unreadable"."""
    if not project.upstream_api_key:
        return "not set"
    try:
        crypto.decrypt(project.upstream_api_key)
    except crypto.SecretUnreadable:
        return "unreadable"
    return "set"
