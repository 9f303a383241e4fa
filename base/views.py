from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, time, timedelta
from time import monotonic
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from base import selectors, services, upstream_check
from base.decorators import project_view
from base.errors import Conflict, DomainError
from base.forms import ProjectSettingsForm
from base.middleware import CurrentProjectMiddleware
from base.models import ApiKeyScope, AuditEvent, Membership, Role
from base.pagination import paginate
from base.requests import ProjectRequest
from base.selectors import projects_for_user

# Each dependency a readiness check asks gets this long; the answer comes within about a second.
HEALTH_CHECK_SECONDS = 0.8
_health_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="healthz")
# What a load balancer is asked to wait before it tries a process that is not ready again.
READY_RETRY_AFTER_SECONDS = 5


def _database_ok() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()  # this thread's connection, back to the pool


def _redis_ok() -> None:
    from django.conf import settings

    if getattr(settings, "REDIS_URL", ""):
        from base.counters import redis_client

        redis_client().ping()


LIVE_BODY = {"ok": True, "probe": "live"}


@require_GET
async def livez(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers, and nothing else is asked (no database, no Redis), so an
    outage of either never gets healthy processes restarted. Async: it never waits for the
    thread that sync views share. Under uvicorn the fast lane answers it before Django
    (``base.fast_lane``); this view is the WSGI door's."""
    return JsonResponse(LIVE_BODY)


@require_GET
def readyz(request: HttpRequest) -> HttpResponse:
    """Readiness: the database and Redis, each within ``HEALTH_CHECK_SECONDS``; 503 with
    Retry-After naming what is down."""
    futures = {"database": _health_checks.submit(_database_ok)}
    futures["redis"] = _health_checks.submit(_redis_ok)
    deadline = monotonic() + HEALTH_CHECK_SECONDS
    checks: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - monotonic()))
            checks[name] = "ok"
        except FutureTimeout:
            checks[name] = f"no answer within {HEALTH_CHECK_SECONDS:g} s"
        except Exception as exc:  # noqa: BLE001 - what is down is the answer
            checks[name] = f"down: {type(exc).__name__}: {str(exc)[:200]}"
    ok = all(v == "ok" for v in checks.values())
    response = JsonResponse(
        {
            "ok": ok,
            "probe": "ready",
            "checks": checks,
            "down": [k for k, v in checks.items() if v != "ok"],
        },
        status=200 if ok else 503,
    )
    if not ok:
        response["Retry-After"] = str(READY_RETRY_AFTER_SECONDS)
    return response


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    """The older door to both probes, kept for deployments that use it:
    ``/healthz?probe=live`` is ``/livez``, ``/healthz`` is ``/readyz``."""
    if request.GET.get("probe") == "live":
        return JsonResponse(LIVE_BODY)
    return readyz(request)


@require_GET
@login_required
def home(request: HttpRequest) -> HttpResponse:
    project = getattr(request, "current_project", None)
    if not project:
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


# --- Project administration pages: audit log, API keys, members ------------------------------
# Thin views: reads through selectors, writes through base.services.

AUDIT_PAGE_SIZE = 50


def _parse_when(value: str, *, field: str, end: bool = False) -> datetime | None:
    """A date or date-time from a filter box, aware in the site's time zone. A bare date as the
    end of a range means the whole of that day."""
    value = value.strip()
    if not value:
        return None
    try:
        when = parse_datetime(value)
        if when is None:
            day = parse_date(value)
            if day is None:
                raise ValueError(value)
            when = datetime.combine(day, time.min)
            if end:
                when += timedelta(days=1)
    except ValueError as exc:
        raise DomainError(
            f"'{value}' is not a date (YYYY-MM-DD) or date and time.", field=field
        ) from exc
    if timezone.is_naive(when):
        when = timezone.make_aware(when)
    return when


@require_GET
@project_view()
def audit_log(request: ProjectRequest) -> HttpResponse:
    project = request.project
    filters = {
        name: request.GET.get(name, "").strip()
        for name in ("action", "actor", "object_type", "since", "until")
    }
    errors: dict[str, str] = {}
    bounds: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        try:
            bounds[name] = _parse_when(filters[name], field=name, end=name == "until")
        except DomainError as exc:
            errors[name] = str(exc)
            bounds[name] = None
    events: list[AuditEvent] = []
    next_cursor = None
    if not errors:
        qs = selectors.audit_events_filtered(
            project,
            action=filters["action"],
            actor=filters["actor"],
            object_type=filters["object_type"],
            since=bounds["since"],
            until=bounds["until"],
        )
        try:
            events, next_cursor = paginate(
                qs,
                time_field="created_at",
                cursor=request.GET.get("cursor") or None,
                limit=AUDIT_PAGE_SIZE,
            )
        except DomainError as exc:
            errors["cursor"] = str(exc)
    actions, object_types = selectors.audit_filter_choices(project)
    # A value picked from an older part of the log stays selectable.
    if filters["action"] and filters["action"] not in actions:
        actions.append(filters["action"])
    if filters["object_type"] and filters["object_type"] not in object_types:
        object_types.append(filters["object_type"])
    given = {name: value for name, value in filters.items() if value}
    context = {
        "rows": [
            {
                "event": event,
                "before": _json(event.before),
                "after": _json(event.after),
            }
            for event in events
        ],
        "filters": filters,
        "errors": errors,
        "actions": actions,
        "object_types": object_types,
        "next_url": "?" + urlencode({**given, "cursor": next_cursor}) if next_cursor else "",
        "first_url": "?" + urlencode(given) if given else request.path,
        "is_later_page": bool(request.GET.get("cursor")),
    }
    if request.htmx:
        # htmx swaps only 2xx answers; the partial itself names the bad field.
        return render(request, "base/audit_log.html#audit-table", context)
    return render(request, "base/audit_log.html", context, status=400 if errors else 200)


def _json(value: object) -> str:
    if value is None:
        return ""
    return json.dumps(value, indent=1, sort_keys=True, default=str)


def _api_keys_context(request: ProjectRequest, **extra: object) -> dict:
    project = request.project
    return {
        "keys": list(selectors.api_keys_for_project(project)),
        "scopes": ApiKeyScope.choices,
        **extra,
    }


@require_GET
@project_view(role=Role.ADMIN)
def api_keys(request: ProjectRequest) -> HttpResponse:
    # The onboarding panel's link fills the form in (?name=…&scopes=runtime&scopes=ingest).
    form = {"name": request.GET.get("name", "")[:200], "scopes": request.GET.getlist("scopes")}
    return render(request, "base/api_keys.html", _api_keys_context(request, form=form))


@require_POST
@project_view(role=Role.ADMIN)
def api_keys_create(request: ProjectRequest) -> HttpResponse:
    form = {"name": request.POST.get("name", ""), "scopes": request.POST.getlist("scopes")}
    try:
        issued = services.api_key_create(
            project=request.project,
            name=form["name"],
            scopes=form["scopes"],
            actor=request.user,
        )
    except DomainError as exc:
        context = _api_keys_context(request, form=form, errors={exc.field or "name": str(exc)})
        return render(request, "base/api_keys.html", context, status=422)
    # The secret is in this response only: never stored, never cached, never shown again.
    response = render(
        request,
        "base/api_keys.html",
        _api_keys_context(request, form={}, issued=issued),
        status=201,
    )
    response["Cache-Control"] = "no-store"
    return response


@require_POST
@project_view(role=Role.ADMIN)
def api_keys_revoke(request: ProjectRequest, key_id: int) -> HttpResponse:
    project = request.project
    api_key = get_object_or_404(selectors.api_keys_for_project(project), pk=key_id)
    try:
        services.api_key_revoke(api_key=api_key, actor=request.user)
    except DomainError as exc:
        if request.htmx:
            return HttpResponse(str(exc), status=409)
        messages.error(request, str(exc))
    else:
        if request.htmx:
            return render(request, "base/api_keys.html#key-table", _api_keys_context(request))
        messages.success(request, f"Key {api_key.name} (mc_{api_key.prefix}…) revoked.")
    return redirect("project:api_keys", project_slug=project.slug)


def _members_context(request: ProjectRequest, **extra: object) -> dict:
    project = request.project
    return {
        "memberships": list(selectors.memberships_for_project(project)),
        "roles": Role.choices,
        **extra,
    }


@require_GET
@project_view(role=Role.ADMIN)
def members(request: ProjectRequest) -> HttpResponse:
    return render(request, "base/members.html", _members_context(request, form={}))


@require_POST
@project_view(role=Role.ADMIN)
def members_add(request: ProjectRequest) -> HttpResponse:
    project = request.project
    form = {"username": request.POST.get("username", "").strip(), "role": request.POST.get("role")}
    user = get_user_model().objects.filter(username=form["username"]).first()
    try:
        if user is None:
            raise DomainError(f"No user '{form['username']}'.", field="username")
        if selectors.memberships_for_project(project).filter(user=user).exists():
            raise Conflict(f"{user.get_username()} is a member already.", field="username")
        services.membership_set(
            project=project, user=user, role=form["role"] or "", actor=request.user
        )
    except DomainError as exc:
        context = _members_context(request, form=form, errors={exc.field or "username": str(exc)})
        return render(request, "base/members.html", context, status=422)
    messages.success(request, f"{user.get_username()} added as {form['role']}.")
    return redirect("project:members", project_slug=project.slug)


def _member_or_404(request: ProjectRequest, user_id: int) -> Membership:
    project = request.project
    return get_object_or_404(selectors.memberships_for_project(project), user_id=user_id)


@require_POST
@project_view(role=Role.ADMIN)
def members_set_role(request: ProjectRequest, user_id: int) -> HttpResponse:
    project = request.project
    membership = _member_or_404(request, user_id)
    role = request.POST.get("role", "")
    try:
        services.membership_set(
            project=project, user=membership.user, role=role, actor=request.user
        )
    except DomainError as exc:
        messages.error(request, str(exc))
        return redirect("project:members", project_slug=project.slug)
    messages.success(request, f"{membership.user.get_username()} is now {role}.")
    if membership.user == request.user and role != Role.ADMIN and not request.user.is_superuser:
        return redirect("home")  # no longer allowed on this page
    return redirect("project:members", project_slug=project.slug)


@require_POST
@project_view(role=Role.ADMIN)
def members_remove(request: ProjectRequest, user_id: int) -> HttpResponse:
    project = request.project
    membership = _member_or_404(request, user_id)
    try:
        services.membership_remove(project=project, user=membership.user, actor=request.user)
        messages.success(request, f"{membership.user.get_username()} removed.")
    except DomainError as exc:
        messages.error(request, str(exc))
        return redirect("project:members", project_slug=project.slug)
    if membership.user == request.user and not request.user.is_superuser:
        return redirect("home")
    return redirect("project:members", project_slug=project.slug)


# --- Project settings ------------------------------------------------------------------------


def _settings_context(request: ProjectRequest, form: ProjectSettingsForm, **extra: object) -> dict:
    return {
        "form": form,
        "sections": [(title, [form[name] for name in names]) for title, names in form.SECTIONS],
        "site_upstream": services.upstream_url_effective(""),
        **extra,
    }


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def project_settings(request: ProjectRequest) -> HttpResponse:
    project = request.project
    if request.method == "GET":
        form = ProjectSettingsForm(project=project)
        return render(request, "base/project_settings.html", _settings_context(request, form))
    form = ProjectSettingsForm(request.POST, project=project)
    if form.is_valid():
        try:
            services.project_settings_update(
                project=project, changes=form.changes(), actor=request.user
            )
        except DomainError as exc:
            form.add_domain_error(exc)
        else:
            messages.success(request, "Settings saved.")
            return redirect("project:settings", project_slug=project.slug)
    context = _settings_context(request, form)
    return render(request, "base/project_settings.html", context, status=422)


@require_POST
@project_view(role=Role.ADMIN)
def project_settings_test(request: ProjectRequest) -> HttpResponse:
    """The "Test connection" button: the upstream as the form now says (an empty key field:
    the stored key), asked for its models. An htmx request gets the result partial; a plain
    POST the whole page, with what was typed kept (the key never: it is write-only)."""
    project = request.project
    post = request.POST
    api_key: str | None = post.get("upstream_api_key", "").strip() or None
    if post.get("upstream_api_key_clear"):
        api_key = ""
    result = upstream_check.project_upstream_check(
        project=project, actor=request.user, base_url=post.get("upstream_base_url"), api_key=api_key
    )
    if request.htmx:
        return render(request, "base/project_settings.html#upstream-test", {"test": result})
    typed = {
        name: post[name]
        for name in ProjectSettingsForm.base_fields
        if name in post and name not in ("upstream_api_key", "upstream_api_key_clear")
    }
    form = ProjectSettingsForm(
        project=project, initial={**ProjectSettingsForm.initial_for(project), **typed}
    )
    return render(
        request, "base/project_settings.html", _settings_context(request, form, test=result)
    )
