"""The replay gate on the dashboard: the panel a version's page (and the review page) loads,
polled while a gate runs (pairs replayed of the sample), and the button that runs the gate.
Thin: ``skills.gate.services`` and ``.selectors``."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from base.decorators import project_view
from base.errors import DomainError
from base.models import Role
from base.requests import ProjectRequest
from skills.gate import selectors, services
from skills.versions.selectors import version_for_project

TEMPLATE = "skills/_replay_gate.html"
# While a gate runs, its panel asks for itself again this often (pairs appear as judged).
POLL_SECONDS = 2


def _panel(
    request: ProjectRequest, number: int, status: int = 200, **extra: object
) -> HttpResponse:
    version = version_for_project(request.project, number)
    gate, pairs = selectors.gate_with_pairs(version)
    context = {
        "version": version,
        "gate": gate,
        "progress": selectors.gate_progress(gate, request.project) if gate else None,
        "poll_seconds": POLL_SECONDS,
        "pairs": pairs[:10],
        "mode": request.project.replay_gate_mode,
        "can_admin": request.membership.has_role(Role.ADMIN),
        **extra,
    }
    template = TEMPLATE + "#gate" if request.htmx else TEMPLATE
    return render(request, template, context, status=status)


@require_GET
@project_view()
def replay_gate_panel(request: ProjectRequest, number: int) -> HttpResponse:
    return _panel(request, number)


@require_POST
@project_view(role=Role.ADMIN)
def replay_gate_run(request: ProjectRequest, number: int) -> HttpResponse:
    version = version_for_project(request.project, number)
    try:
        services.replay_gate_request(version=version, actor=request.user)
    except DomainError as exc:
        if request.htmx:
            return _panel(request, number, status=409, error=str(exc))
        messages.error(request, str(exc))
    else:
        if not request.htmx:
            messages.success(request, "Replay gate queued.")
    if request.htmx:
        return _panel(request, number)
    return redirect("skills:version_detail", project_slug=request.project.slug, number=number)
