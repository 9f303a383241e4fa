"""Incident group pages (Sentry-like). Thin: selectors for reads, services for writes."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from base.decorators import project_view
from base.errors import DomainError
from base.models import Role
from base.requests import ProjectRequest
from incidents import selectors, services
from incidents.models import GroupStatus, IncidentKind

PAGE_SIZE = 50


@require_GET
@project_view()
def group_list(request: ProjectRequest) -> HttpResponse:
    project = request.project
    status = request.GET.get("status", "") or None
    kind = request.GET.get("kind", "") or None
    agent = request.GET.get("agent", "") or None
    qs = selectors.groups_for_project(project, status=status, kind=kind, agent=agent).order_by(
        "-last_seen", "-id"
    )
    page = Paginator(qs, PAGE_SIZE).get_page(request.GET.get("page"))
    groups = list(page.object_list)
    sparks = selectors.daily_counts([g.id for g in groups])
    rows = [{"group": g, "spark": sparks.get(g.id, [])} for g in groups]
    context = {
        # Detail links are built from the list's own address: one reverse() per page, not
        # one per row (reversing dominated the render time of a 50-row page).
        "list_url": request.path,
        "page": page,
        "rows": rows,
        "filters": {"status": status or "", "kind": kind or "", "agent": agent or ""},
        "statuses": GroupStatus.choices,
        "kinds": IncidentKind.choices,
        "agents": selectors.agents_for_project(project),
    }
    template = "incidents/group_list.html"
    if request.htmx:
        template += "#group-table"
    return render(request, template, context)


@require_GET
@project_view()
def group_detail(request: ProjectRequest, group_id: int) -> HttpResponse:
    project = request.project
    group = selectors.group_for_project(project, group_id)
    incidents = list(
        selectors.incidents_for_project(project, group_id=group.id).order_by("-occurred_at")[:20]
    )
    return render(
        request,
        "incidents/group_detail.html",
        {
            "group": group,
            "incidents": incidents,
            "spark": selectors.daily_counts([group.id])[group.id],
        },
    )


@require_POST
@project_view(role=Role.REVIEWER)
def group_status(request: ProjectRequest, group_id: int) -> HttpResponse:
    project = request.project
    group = selectors.group_for_project(project, group_id)
    try:
        services.group_set_status(
            group=group, status=request.POST.get("status", ""), actor=request.user
        )
        messages.success(request, "Group updated.")
    except DomainError as exc:
        messages.error(request, str(exc))
    return redirect("incidents:group_detail", project_slug=project.slug, group_id=group.id)
