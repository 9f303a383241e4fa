"""The effectiveness panel (``skills/_effectiveness.html``), loaded by htmx into the revision,
version and group pages; the group page is the incidents app's, which cannot render skills'
figures itself. A plain GET (the placeholder's link) gets the same fragment."""

from __future__ import annotations

from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from base.decorators import project_view
from base.errors import NotFound
from base.requests import ProjectRequest
from incidents.selectors import group_for_project
from skills.effectiveness import charts, services
from skills.effectiveness.services import Measurement
from skills.versions import selectors

TEMPLATE = "skills/_effectiveness.html"


def _panel(request: ProjectRequest, measurement: Measurement, **extra) -> HttpResponse:
    context = {
        "eff": measurement,
        "chart": charts.rate_chart(measurement.series, measurement.marks),
        "limits": services.thresholds(),
        **extra,
    }
    return render(request, TEMPLATE, context)


@require_GET
@project_view()
def revision_effectiveness(request: ProjectRequest, revision_id: int) -> HttpResponse:
    try:
        revision = selectors.revision_for_project(request.project, revision_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    measurement = services.revision_effectiveness(request.project, revision)
    return _panel(request, measurement, revision=revision)


@require_GET
@project_view()
def version_effectiveness(request: ProjectRequest, number: int) -> HttpResponse:
    try:
        version = selectors.version_for_project(request.project, number)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    return _panel(request, services.version_effectiveness(request.project, version))


@require_GET
@project_view()
def group_effectiveness(request: ProjectRequest, group_id: int) -> HttpResponse:
    try:
        group = group_for_project(request.project, group_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    return _panel(request, services.group_effectiveness(request.project, group))
