from __future__ import annotations

from typing import Any

from django.http import HttpRequest


def current_project(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from base.selectors import membership_for, projects_for_user

    project = getattr(request, "current_project", None)
    if project is not None and not project:  # an empty lazy object: no project at all
        project = None
    membership = getattr(request, "membership", None)
    if project is not None and (membership is None or membership.project_id != project.pk):
        membership = membership_for(user=user, project=project)
    return {
        "current_project": project,
        "current_membership": membership,
        "current_role": membership.role if membership else None,
        "user_projects": projects_for_user(user).order_by("name"),
    }
