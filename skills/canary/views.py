"""The canary's controls on the dashboard (the versions page loads the panel): start, stop,
promote. Thin: ``skills.canary.services``; htmx requests get the re-rendered panel, full POSTs
a redirect to the versions page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from base.decorators import project_view
from base.errors import Conflict, DomainError, NotFound, PermissionDenied
from base.models import Role
from base.requests import ProjectRequest
from skills.canary import selectors, services
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.selectors import version_for_project

TEMPLATE = "skills/_canary.html"


def _status(exc: DomainError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, PermissionDenied):
        return 403
    return 409 if isinstance(exc, Conflict) else 422


def _context(request: ProjectRequest, **extra: Any) -> dict[str, Any]:
    project = request.project
    canary = selectors.running_canary(project)
    history = selectors.canaries_for_project(project, limit=5)
    return {
        "canary": canary,
        "figures": selectors.canary_figures(canary).as_dict() if canary else None,
        "last": None if canary or not history else history[0],
        "candidates": list(
            PolicyVersion.objects.filter(project=project, status=VersionStatus.CANDIDATE)
            .order_by("-number")
            .values_list("number", flat=True)[:50]
        ),
        "can_admin": request.membership.has_role(Role.ADMIN),
        "form": {"share_percent": 10, "margin_per_1000": 20, "min_turns": 200},
        **extra,
    }


def _panel(request: ProjectRequest, status: int = 200, **extra: Any) -> HttpResponse:
    template = TEMPLATE + "#canary" if request.htmx else TEMPLATE
    return render(request, template, _context(request, **extra), status=status)


@require_GET
@project_view()
def canary_panel(request: ProjectRequest) -> HttpResponse:
    return _panel(request)


def _act(request: ProjectRequest, act: Callable[[], Any], done: str) -> HttpResponse:
    try:
        act()
    except DomainError as exc:
        if request.htmx:
            return _panel(request, status=_status(exc), error=str(exc), form=request.POST)
        messages.error(request, str(exc))
    else:
        if request.htmx:
            return _panel(request, notice=done)
        messages.success(request, done)
    return redirect("skills:version_list", project_slug=request.project.slug)


def _number(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


@require_POST
@project_view(role=Role.ADMIN)
def canary_start(request: ProjectRequest) -> HttpResponse:
    def start() -> None:
        services.canary_start(
            version=version_for_project(request.project, request.POST.get("version")),
            actor=request.user,
            share_percent=int(_number(request.POST.get("share_percent"), 0)),
            margin_per_1000=_number(request.POST.get("margin_per_1000"), -1),
            min_turns=int(_number(request.POST.get("min_turns"), 0)),
        )

    return _act(request, start, "Canary started.")


def _end(request: ProjectRequest, end: Callable[..., Any], done: str) -> HttpResponse:
    """Stop or promote the running canary (``end``: the service) with the form's reason."""

    def act() -> None:
        canary = selectors.running_canary(request.project)
        if canary is None:
            raise Conflict("No canary is running.")
        end(canary=canary, actor=request.user, reason=request.POST.get("reason", ""))

    return _act(request, act, done)


@require_POST
@project_view(role=Role.ADMIN)
def canary_stop(request: ProjectRequest) -> HttpResponse:
    return _end(
        request, services.canary_stop, "Canary stopped: every session gets the active version."
    )


@require_POST
@project_view(role=Role.ADMIN)
def canary_promote(request: ProjectRequest) -> HttpResponse:
    return _end(request, services.canary_promote, "Promoted to every session.")
