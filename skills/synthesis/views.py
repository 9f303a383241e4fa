"""The fast loop's page action: try a group's synthesis again (from the group's page)."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from base.decorators import project_view
from base.errors import DomainError, NotFound
from base.models import Role
from base.requests import ProjectRequest
from incidents.selectors import group_for_project
from skills.synthesis.services import group_synthesis_retry


@require_POST
@project_view(role=Role.REVIEWER)
def group_retry_synthesis(request: ProjectRequest, group_id: int) -> HttpResponse:
    project = request.project
    try:
        group = group_for_project(project, group_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    try:
        group_synthesis_retry(group=group, actor=request.user)
        messages.success(request, "Synthesis requested again.")
    except DomainError as exc:
        messages.error(request, str(exc))
    return redirect("incidents:group_detail", project_slug=project.slug, group_id=group.pk)
