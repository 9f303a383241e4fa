"""Incident group pages (Sentry-like). Thin: selectors for reads, services for writes."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from urllib.parse import urlencode
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from base import services as base_services
from base.decorators import project_view
from base.errors import DomainError
from base.models import Project, Role
from base.pagination import paginate
from base.partials import render_page
from base.requests import ProjectRequest
from incidents import provenance, selectors, services
from incidents.models import (
    AbusiveSource,
    GroupStatus,
    IncidentGroup,
    IncidentKind,
    TrajectorySource,
)

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
    return render_page(request, "incidents/group_list.html", "group-table", context)


@require_GET
@project_view()
def group_detail(request: ProjectRequest, group_id: int) -> HttpResponse:
    project = request.project
    group = selectors.group_for_page(project, group_id)
    if group.merged_into_id:
        # A merged group lives on as an alias of the group it joined: show that one.
        messages.info(request, f"Group {group.pk} was merged into this group.")
        return redirect(
            "incidents:group_detail", project_slug=project.slug, group_id=group.merged_into_id
        )
    incidents = list(
        selectors.incidents_for_project(project, group_id=group.id).order_by("-occurred_at")[:20]
    )
    return render(
        request,
        "incidents/group_detail.html",
        {
            "group": group,
            # Redacted for the person looking: personal data stays masked unless an admin looks.
            "incidents": selectors.incidents_for_display(
                incidents, personal_data=not request.membership.has_role(Role.ADMIN)
            ),
            "spark": selectors.daily_counts([group.id])[group.id],
            "fingerprints": selectors.group_fingerprints(group),
            "related": selectors.related_groups(group),
        },
    )


def _group_action(act: Callable[[ProjectRequest, IncidentGroup], str]) -> Callable:
    """A reviewer's plain POST on a group's page: ``act`` calls the service and says what it
    did, or its refusal is shown instead; either way back to the group's page."""

    @require_POST
    @project_view(role=Role.REVIEWER)
    @wraps(act)
    def view(request: ProjectRequest, group_id: int) -> HttpResponse:
        group = selectors.group_for_project(request.project, group_id)
        try:
            messages.success(request, act(request, group))
        except DomainError as exc:
            messages.error(request, str(exc))
        return redirect(
            "incidents:group_detail", project_slug=request.project.slug, group_id=group.id
        )

    return view


@_group_action
def group_status(request: ProjectRequest, group: IncidentGroup) -> str:
    services.group_set_status(
        group=group, status=request.POST.get("status", ""), actor=request.user
    )
    return "Group updated."


def _group_ids(text: str) -> list[int]:
    ids = [part.strip().lstrip("#") for part in text.replace(",", " ").split()]
    if not ids or not all(part.isdigit() for part in ids):
        raise DomainError(
            "Give the numbers of the groups to merge, e.g. 12, 15.", field="group_ids"
        )
    return [int(part) for part in ids]


@_group_action
def group_merge(request: ProjectRequest, group: IncidentGroup) -> str:
    """Merge the groups named in the form (checked boxes or typed numbers) into this one."""
    ids = _group_ids(" ".join(request.POST.getlist("group_ids")))
    services.groups_merge(
        project=request.project, target_id=group.pk, source_ids=ids, actor=request.user
    )
    return f"Merged {len(ids)} group{'s' if len(ids) != 1 else ''} here."


@_group_action
def group_split(request: ProjectRequest, group: IncidentGroup) -> str:
    """Split the incidents of one fingerprint off this group."""
    parts = services.group_split(
        project=request.project,
        group_id=group.pk,
        fingerprints=request.POST.getlist("fingerprint"),
        actor=request.user,
    )
    return "Split off: " + ", ".join(f"group {p.pk}" for p in parts) + "."


# --- Onboarding: from an empty project to the first proxied request and the first incident ----

ONBOARDING_POLL_SECONDS = 3


def _proxy_base_url() -> str:
    """The base URL an agent's OpenAI client takes: the public address plus the proxy's path
    without ``/chat/completions`` (the SDK adds it)."""
    path = reverse("proxy_chat_completions").removesuffix("/chat/completions")
    return settings.METACLAW_PUBLIC_URL.rstrip("/") + path


def _onboarding_context(request: ProjectRequest) -> dict:
    project: Project = request.project
    public_url = settings.METACLAW_PUBLIC_URL.rstrip("/")
    keys_url = reverse("project:api_keys", kwargs={"project_slug": project.slug})
    return {
        "onboarding": selectors.project_onboarding(project),
        "poll_seconds": ONBOARDING_POLL_SECONDS,
        "proxy_base_url": _proxy_base_url(),
        "incidents_url": public_url + reverse("api:post_incident"),
        "upstream_url": base_services.upstream_url_effective(project.upstream_base_url),
        "upstream_is_site": not project.upstream_base_url,
        "is_admin": request.membership.has_role(Role.ADMIN),
        "create_key_url": keys_url
        + "?"
        + urlencode({"name": "agent", "scopes": ["runtime", "ingest"]}, doseq=True),
    }


@require_GET
@project_view()
def onboarding(request: ProjectRequest) -> HttpResponse:
    """The getting-started panel. ``?part=panel`` (the home page loads it with htmx): the panel
    while the project is new, else nothing; ``?part=status`` (polled every few seconds): the
    waiting states alone. Without ``part``: the page, whatever the project's state."""
    part = request.GET.get("part", "")
    if part == "panel" and not selectors.project_is_new(request.project):
        return HttpResponse("")
    context = _onboarding_context(request)
    if part == "status":
        return render(request, "base/_onboarding.html#onboarding-status", context)
    if part == "panel":
        return render(request, "base/_onboarding.html", context)
    return render(request, "base/onboarding.html", context)


# --- Recorded turns: what each turn ran with ----------------------------------------------


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@require_GET
@project_view()
def turn_list(request: ProjectRequest) -> HttpResponse:
    filters = {
        "source": request.GET.get("source", ""),
        "version": request.GET.get("version", ""),
        "skill": request.GET.get("skill", "").strip(),
        "model": request.GET.get("model", "").strip(),
        "status": request.GET.get("status", ""),
    }
    qs = selectors.turns_for_project(
        request.project,
        source=filters["source"] or None,
        policy_version=_int_or_none(filters["version"]),
        skill=filters["skill"] or None,
        model=filters["model"] or None,
        status=_int_or_none(filters["status"]),
    ).defer("messages", "response", "tools")
    try:
        turns, next_cursor = paginate(
            qs, time_field="occurred_at", cursor=request.GET.get("cursor"), limit=PAGE_SIZE
        )
    except DomainError:  # a cursor edited by hand: start from the newest
        turns, next_cursor = paginate(qs, time_field="occurred_at", cursor=None, limit=PAGE_SIZE)
    context = {
        "list_url": request.path,
        "rows": [{"turn": t, "skills": selectors.turn_retrieval(t)["skills"]} for t in turns],
        "filters": filters,
        "next_query": urlencode({**filters, "cursor": next_cursor}) if next_cursor else "",
        "sources": TrajectorySource.choices,
    }
    return render_page(request, "incidents/turn_list.html", "turn-table", context)


@require_GET
@project_view()
def turn_detail(request: ProjectRequest, turn_id: UUID) -> HttpResponse:
    turn = selectors.turn_for_project(request.project, turn_id)
    retrieval = selectors.turn_retrieval_for_display(
        turn, personal_data=not request.membership.has_role(Role.ADMIN)
    )
    metadata = turn.metadata if isinstance(turn.metadata, dict) else {}
    return render(
        request,
        "incidents/turn_detail.html",
        {
            "turn": turn,
            "retrieval": retrieval,
            "requested_model": metadata.get("requested_model", "")
            if turn.source == "proxy"
            else "",
        },
    )


# --- Abusive sources: mark a session or end user from an incident card ------------------------

ABUSIVE_SOURCE_TEMPLATE = "incidents/_abusive_source.html"


def _back_url(request: ProjectRequest) -> str:
    """Where a plain form POST returns: the page it came from, when it is ours."""
    back = request.POST.get("next", "")
    if back and url_has_allowed_host_and_scheme(
        back, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return back
    return reverse("incidents:group_list", kwargs={"project_slug": request.project.slug})


def _abusive_source_answer(
    request: ProjectRequest,
    *,
    kind: str,
    value: str,
    mark: AbusiveSource | None,
    error: DomainError | None = None,
    success: str = "",
) -> HttpResponse:
    """htmx gets the source's block re-rendered (422 with the error beside the form); a plain
    form POST goes back to the page it came from (POST/redirect/GET)."""
    if not request.htmx:
        if error:
            messages.error(request, str(error))
        else:
            messages.success(request, success)
        return redirect(_back_url(request))
    source = {
        "kind": kind,
        "value": value,
        "shown": value,  # only admins get here, and they see personal data
        "mark": mark,
        "can_mark": True,
        "back": _back_url(request),
    }
    context = {"source": source, "reason": request.POST.get("reason", "")}
    if error:
        context.update(error=str(error), error_field=error.field or "")
    return render(request, ABUSIVE_SOURCE_TEMPLATE, context, status=422 if error else 200)


@require_POST
@project_view(role=Role.ADMIN)
def abusive_source_mark(request: ProjectRequest) -> HttpResponse:
    """Mark the session or end user of an incident as abusive, with a reason (the page asks
    for one; the API leaves it optional): the service the API calls, audited there."""
    kind = request.POST.get("kind", "")
    value = request.POST.get("value", "")
    reason = request.POST.get("reason", "").strip()
    try:
        if not reason:
            raise DomainError("Give a reason: the audit log keeps it.", field="reason")
        mark = services.abusive_source_mark(
            project=request.project, kind=kind, value=value, reason=reason, actor=request.user
        )
    except DomainError as exc:
        return _abusive_source_answer(request, kind=kind, value=value, mark=None, error=exc)
    return _abusive_source_answer(
        request, kind=kind, value=value, mark=mark, success=f"Marked {mark} as abusive."
    )


@require_POST
@project_view(role=Role.ADMIN)
def abusive_source_unmark(request: ProjectRequest, mark_id: int) -> HttpResponse:
    """Take a mark back (the service the API's DELETE calls, audited there)."""
    mark = provenance.abusive_source_for_project(request.project, mark_id)
    services.abusive_source_unmark(project=request.project, mark_id=mark.pk, actor=request.user)
    return _abusive_source_answer(
        request, kind=mark.kind, value=mark.value, mark=None, success=f"Unmarked {mark}."
    )
