from __future__ import annotations

from typing import Any

from django.http import HttpRequest


def current_project(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from .selectors import membership_for, projects_for_user

    project = getattr(request, "current_project", None)
    membership = membership_for(user=user, project=project) if project else None
    return {
        "current_project": project,
        "current_membership": membership,
        "current_role": membership.role if membership else None,
        "user_projects": projects_for_user(user).order_by("name"),
    }
