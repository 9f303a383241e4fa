"""The request types that pages and API handlers see, for type checkers and readers.

Django builds a plain ``HttpRequest`` (``ASGIRequest``, ``WSGIRequest``) for every request;
middleware, ``project_view`` and the API's authentication then attach attributes to it. These
subclasses declare those attributes and are used only in annotations: nothing instantiates
them, and a ``cast`` in the one place that sets the attributes (the ``attach_*`` helpers below,
``CurrentProjectMiddleware``) makes a plain request one of them."""

from __future__ import annotations

from typing import cast

from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails

from base.models import ApiKey, Membership, Project


class SiteRequest(HttpRequest):
    """Any request that passed the site's middleware stack."""

    htmx: HtmxDetails  # django-htmx's HtmxMiddleware
    # base.middleware.CurrentProjectMiddleware: the project switcher's choice, loaded lazily;
    # on a project page, that page's project.
    current_project: Project | None


class ProjectRequest(SiteRequest):
    """A request to a project page (``base.decorators.project_view``): the signed-in person is
    a member of ``project`` with at least the page's role."""

    project: Project
    membership: Membership


class ApiRequest(HttpRequest):
    """A request to an API handler that an API key authenticated (``base.auth.ApiKeyAuth``,
    the runtime's ``RuntimeAuth``): ``project`` is the key's project."""

    api_key: ApiKey
    project: Project


def attach_project(
    request: HttpRequest, *, project: Project, membership: Membership
) -> ProjectRequest:
    """Make ``request`` a project page's request (``project_view`` does, before the view)."""
    project_request = cast(ProjectRequest, request)
    project_request.project = project
    project_request.membership = membership
    project_request.current_project = project
    return project_request


def attach_api_key(request: HttpRequest, api_key: ApiKey) -> ApiRequest:
    """Make ``request`` an authenticated API request (the API keys' authentication does)."""
    api_request = cast(ApiRequest, request)
    api_request.api_key = api_key
    api_request.project = api_key.project
    return api_request
