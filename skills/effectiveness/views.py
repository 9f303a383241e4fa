"""The effectiveness panel (``skills/_effectiveness.html``), loaded by htmx into the revision,
version and group pages; the group page is the incidents app's, which cannot render skills'
figures itself. A plain GET (the placeholder's link) gets the same fragment. An object of
another project is a 404 (``project_view`` turns the selectors' ``NotFound`` into one)."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from base.decorators import project_view
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
    revision = selectors.revision_for_project(request.project, revision_id)
    measurement = services.revision_effectiveness(request.project, revision)
    return _panel(request, measurement, revision=revision)


@require_GET
@project_view()
def version_effectiveness(request: ProjectRequest, number: int) -> HttpResponse:
    version = selectors.version_for_project(request.project, number)
    return _panel(request, services.version_effectiveness(request.project, version))


@require_GET
@project_view()
def group_effectiveness(request: ProjectRequest, group_id: int) -> HttpResponse:
    group = group_for_project(request.project, group_id)
    return _panel(request, services.group_effectiveness(request.project, group))
