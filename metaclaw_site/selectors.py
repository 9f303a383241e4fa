"""Tenant scoping for the browser: which projects a user may see, with which role."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from .models import ApiKey, AuditEvent, Membership, Project, Role
from .services import NotFound, PermissionDenied


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
