"""Role checks for pages: every project page goes through ``project_view``."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.template.loader import render_to_string

from base.errors import NotFound, PermissionDenied
from base.middleware import CurrentProjectMiddleware
from base.models import Role
from base.requests import attach_project
from base.selectors import project_for_user


def project_view(role: str = Role.VIEWER) -> Callable:
    """Resolve ``project_slug`` to ``request.project`` / ``request.membership`` for a member
    with at least ``role``; 404 for non-members (no leak), 403 for a too-low role."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @login_required
        @wraps(view)
        def wrapper(request: HttpRequest, project_slug: str, *args, **kwargs) -> HttpResponse:
            try:
                project, membership = project_for_user(
                    user=request.user, slug=project_slug, role=role
                )
            except NotFound as exc:
                raise Http404(str(exc)) from exc
            except PermissionDenied as exc:
                return HttpResponseForbidden(
                    render_to_string("403.html", {"message": str(exc)}, request=request)
                )
            # The same object, now typed as what project views read (base.requests).
            request = attach_project(request, project=project, membership=membership)
            if request.session.get(CurrentProjectMiddleware.SESSION_KEY) != project.slug:
                request.session[CurrentProjectMiddleware.SESSION_KEY] = project.slug
            try:
                return view(request, *args, **kwargs)
            except NotFound as exc:  # an object of another project, or none: a plain 404
                raise Http404(str(exc)) from exc

        return wrapper

    return decorator
