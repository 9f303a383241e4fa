from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from .middleware import CurrentProjectMiddleware
from .selectors import projects_for_user


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return JsonResponse({"ok": True})


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    project = getattr(request, "current_project", None)
    if project is None:
        return render(request, "no_project.html")
    return redirect(project_home_url(project.slug))


def project_home_url(slug: str) -> str:
    try:
        return reverse("skills:review_queue", kwargs={"project_slug": slug})
    except Exception:  # noqa: BLE001 - the review queue is optional while apps are built up
        return reverse("incidents:group_list", kwargs={"project_slug": slug})


@require_POST
@login_required
def switch_project(request: HttpRequest) -> HttpResponse:
    slug = request.POST.get("project", "")
    if projects_for_user(request.user).filter(slug=slug).exists():
        request.session[CurrentProjectMiddleware.SESSION_KEY] = slug
        return redirect(project_home_url(slug))
    return redirect("home")
