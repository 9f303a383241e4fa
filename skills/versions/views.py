"""Operators' dashboard: review queue, proposal detail, policy versions, skills library.

Thin views: reads through ``skills.versions.selectors``, decisions through
``skills.versions.services`` (the same ones the API and the approval links call). Role checks:
``project_view`` for the page, and the service again for the action. htmx requests get the
partial that changed."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from base.decorators import project_view
from base.errors import Conflict, DomainError, NotFound, PermissionDenied
from base.models import Role
from base.redaction import redaction_summary
from base.requests import ProjectRequest
from incidents.selectors import agents_for_project, incidents_for_display
from skills.library.models import Category, Origin
from skills.versions import selectors, services
from skills.versions.models import PolicyVersion, VersionStatus

QUEUE_FILTERS = ("category", "origin", "agent", "q", "order")
LIBRARY_PAGE_SIZE = 50
QUEUE_LIMIT = 50
VERSIONS_PAGE_SIZE = 50


def _can(request: ProjectRequest, role: str) -> bool:
    return request.membership.has_role(role)


def _queue_filters(request: ProjectRequest) -> dict[str, str]:
    return {name: request.GET.get(name, "").strip() for name in QUEUE_FILTERS}


def _error_status(exc: DomainError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, Conflict):
        return 409
    return 422


# --- Review queue and proposal detail ----------------------------------------------------------


def _review_context(
    request: ProjectRequest, *, revision_id: Any = None, queue: bool = True, **extra: Any
) -> dict[str, Any]:
    project = request.project
    filters = _queue_filters(request)
    context: dict[str, Any] = {
        "filters": filters,
        "can_review": _can(request, Role.REVIEWER),
        "categories": Category.choices,
        "origins": Origin.choices,
        **extra,
    }
    query = request.GET.urlencode()
    # Detail links are built from one reversed URL: reversing per row costs more than the query.
    context["queue_url"] = reverse("skills:review_queue", kwargs={"project_slug": project.slug})
    context["query_suffix"] = f"?{query}" if query else ""
    if queue:
        try:
            order = selectors.queue_order_check(filters["order"])
        except DomainError as exc:
            # Shown beside the switch (the page answers 400); the queue in the default order.
            context["order_error"] = str(exc)
            order = selectors.DEFAULT_QUEUE_ORDER
        context.update(_order_context(request, order))
        rows = selectors.review_queue(
            project,
            category=filters["category"] or None,
            origin=filters["origin"] or None,
            agent=filters["agent"] or None,
            q=filters["q"] or None,
            order=order,
            limit=QUEUE_LIMIT + 1,
        )
        context["queue"] = rows[:QUEUE_LIMIT]
        context["queue_more"] = len(rows) > QUEUE_LIMIT
        context["agents"] = agents_for_project(project)
    if revision_id is not None:
        detail = selectors.proposal_detail(project, revision_id)
        # The evidence redacted for the person looking (admins see personal data), and what the
        # LLM was shown: what was masked before, and what was looked for.
        detail.incidents = incidents_for_display(
            detail.incidents, personal_data=not _can(request, Role.ADMIN)
        )
        context["detail"] = detail
        context["selected_id"] = detail.revision.pk
        if detail.revision.redactions or detail.incidents:
            context["llm_redaction"] = redaction_summary(detail.revision.redactions)
    return context


def _order_context(request: ProjectRequest, order: str) -> dict[str, Any]:
    """Which order the queue is in, said on the page, and a link to each other order that keeps
    the filters."""
    others = []
    for value, (label, _sort) in selectors.QUEUE_ORDERS.items():
        if value == order:
            continue
        query = request.GET.copy()
        query["order"] = value
        others.append({"value": value, "label": label, "query": query.urlencode()})
    return {
        "order": order,
        "order_label": selectors.QUEUE_ORDERS[order][0],
        "orders": [(value, label) for value, (label, _sort) in selectors.QUEUE_ORDERS.items()],
        "other_orders": others,
        "priority_formula": selectors.PRIORITY_FORMULA,
    }


@require_GET
@project_view()
def review_queue(request: ProjectRequest) -> HttpResponse:
    """The queue, by default in priority order (``selectors._priority``); ``?order=`` picks
    another (``selectors.QUEUE_ORDERS``), and an unknown one answers 400 with the error beside
    the switch."""
    context = _review_context(request)
    status = 400 if context.get("order_error") else 200
    if request.htmx:
        return render(request, "skills/review.html#queue", context, status=status)
    return render(request, "skills/review.html", context, status=status)


@require_GET
@project_view()
def revision_detail(request: ProjectRequest, revision_id: int) -> HttpResponse:
    """The proposal beside the queue; an htmx request gets the detail panel only."""
    partial = bool(request.htmx) and request.htmx.target == "detail"
    try:
        context = _review_context(request, revision_id=revision_id, queue=not partial)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    if partial:
        return render(request, "skills/review.html#detail", context)
    return render(request, "skills/review.html", context)


def _decision_response(
    request: ProjectRequest, revision_id: int, *, error: DomainError | None = None, **extra: Any
) -> HttpResponse:
    """After a decision: htmx gets the re-rendered detail panel (and the queue refreshes);
    a plain form POST is redirected to the proposal page (POST/redirect/GET)."""
    status = _error_status(error) if error else 200
    if request.htmx:
        try:
            context = _review_context(request, revision_id=revision_id, queue=False, **extra)
        except NotFound as exc:
            raise Http404(str(exc)) from exc
        context["error"] = str(error) if error else ""
        response = render(request, "skills/review.html#detail", context, status=status)
        if not error:
            response["HX-Trigger"] = "queue-changed"
        return response
    if error:
        if status == 422:  # keep what was typed
            context = _review_context(request, revision_id=revision_id, **extra)
            context["error"] = str(error)
            return render(request, "skills/review.html", context, status=422)
        messages.error(request, str(error))
    project = request.project
    return redirect("skills:revision_detail", project_slug=project.slug, revision_id=revision_id)


def _revision_or_404(request: ProjectRequest, revision_id: int):
    try:
        return selectors.revision_for_project(request.project, revision_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc


@require_POST
@project_view(role=Role.REVIEWER)
def revision_approve(request: ProjectRequest, revision_id: int) -> HttpResponse:
    revision = _revision_or_404(request, revision_id)
    try:
        revision = services.skill_revision_approve(
            revision=revision,
            actor=request.user,
            reason=request.POST.get("reason", ""),
            override_reason=request.POST.get("override_reason", ""),
        )
    except DomainError as exc:
        return _decision_response(request, revision_id, error=exc)
    if revision.status == "proposed":
        messages.success(request, "First approval recorded; a second reviewer must approve.")
    else:
        messages.success(request, f"Approved {revision.skill.slug} r{revision.number}: it is live.")
    return _decision_response(request, revision_id)


@require_POST
@project_view(role=Role.REVIEWER)
def revision_reject(request: ProjectRequest, revision_id: int) -> HttpResponse:
    revision = _revision_or_404(request, revision_id)
    reason = request.POST.get("reason", "")
    try:
        services.skill_revision_reject(revision=revision, actor=request.user, reason=reason)
    except DomainError as exc:
        return _decision_response(request, revision_id, error=exc, reject_reason=reason)
    messages.success(request, f"Rejected {revision.skill.slug} r{revision.number}.")
    return _decision_response(request, revision_id)


@require_POST
@project_view(role=Role.REVIEWER)
def revision_edit(request: ProjectRequest, revision_id: int) -> HttpResponse:
    """Save the edited text as a new proposal; with ``approve`` set, approve it at once
    (edit-then-approve). Both happen in the services; the redirect goes to the new revision."""
    revision = _revision_or_404(request, revision_id)
    form = {
        name: request.POST.get(name, "")
        for name in ("name", "description", "instructions", "category")
    }
    try:
        new_revision = services.skill_revision_edit(revision=revision, actor=request.user, **form)
    except DomainError as exc:
        return _decision_response(request, revision_id, error=exc, edit_form=form)
    target = new_revision.pk
    if request.POST.get("approve"):
        try:
            new_revision = services.skill_revision_approve(
                revision=new_revision,
                actor=request.user,
                override_reason=request.POST.get("override_reason", ""),
            )
        except DomainError as exc:
            return _decision_response(request, target, error=exc)
        messages.success(request, f"Edited and approved as r{new_revision.number}.")
    else:
        messages.success(request, f"Saved as r{new_revision.number}, waiting for review.")
    project = request.project
    url = reverse(
        "skills:revision_detail", kwargs={"project_slug": project.slug, "revision_id": target}
    )
    if request.htmx:
        response = _decision_response(request, target)
        response["HX-Push-Url"] = url
        return response
    return redirect(url)


# --- Policy versions ---------------------------------------------------------------------------


def _version_or_404(request: ProjectRequest, number: int) -> PolicyVersion:
    try:
        return selectors.version_for_project(request.project, number)
    except NotFound as exc:
        raise Http404(str(exc)) from exc


@require_GET
@project_view()
def version_list(request: ProjectRequest) -> HttpResponse:
    project = request.project
    page = Paginator(selectors.versions_for_project(project), VERSIONS_PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    versions = list(page.object_list)
    active = next((v for v in versions if v.status == VersionStatus.ACTIVE), None)
    if active is None:
        active = selectors.active_version(project)
    return render(
        request,
        "skills/versions.html",
        {
            "page": page,
            "versions": versions,
            "active": active,
            "can_admin": _can(request, Role.ADMIN),
        },
    )


@require_GET
@project_view()
def version_detail(request: ProjectRequest, number: int) -> HttpResponse:
    version = _version_or_404(request, number)
    return render(
        request,
        "skills/version_detail.html",
        {
            "version": version,
            "revisions": selectors.version_revisions(version),
            "releases": selectors.version_releases(version),
            "active": selectors.active_version(request.project),
            "can_admin": _can(request, Role.ADMIN),
        },
    )


@require_GET
@project_view()
def version_diff(request: ProjectRequest) -> HttpResponse:
    project = request.project
    active = selectors.active_version(project)
    try:
        to_number = int(request.GET.get("to") or (active.number if active else 1))
        from_number = int(request.GET.get("from") or max(1, to_number - 1))
        result = selectors.versions_diff(project, from_number, to_number)
    except (NotFound, ValueError) as exc:
        raise Http404("No such policy version in this project.") from exc
    context = {
        "diff": result,
        "numbers": list(
            PolicyVersion.objects.filter(project=project)
            .order_by("-number")
            .values_list("number", "status")[:200]
        ),
    }
    template = "skills/version_diff.html"
    if request.htmx:
        template += "#diff"
    return render(request, template, context)


def _confirm_context(request: ProjectRequest, version: PolicyVersion, action: str) -> dict:
    project = request.project
    active = selectors.active_version(project)
    result = None
    if active is not None and active.pk != version.pk:
        result = selectors.versions_diff(project, active.number, version.number)
    return {"version": version, "active": active, "diff": result, "action": action}


def _version_action(request: ProjectRequest, number: int, action: str, call) -> HttpResponse:
    """GET: a confirmation naming exactly what changes. POST: act through the service."""
    version = _version_or_404(request, number)
    project = request.project
    if request.method == "GET":
        context = _confirm_context(request, version, action)
        return render(request, "skills/version_confirm.html", context)
    reason = request.POST.get("reason", "")
    try:
        call(version=version, actor=request.user, reason=reason)
    except DomainError as exc:
        status = _error_status(exc)
        context = _confirm_context(request, version, action)
        context.update(error=str(exc), reason=reason)
        return render(request, "skills/version_confirm.html", context, status=status)
    replaced = selectors.version_replaced(version) if action != "reject" else None
    messages.success(
        request,
        {
            "promote": f"v{version.number} is now active; it replaced v{replaced}.",
            "rollback": f"Rolled back: v{version.number} is active again, v{replaced} retired.",
            "reject": f"v{version.number} rejected.",
        }[action],
    )
    return redirect("skills:version_detail", project_slug=project.slug, number=version.number)


def _version_number(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def version_promote(request: ProjectRequest, number: int) -> HttpResponse:
    """The confirmation carries the active version it showed (``replaces``): if another one is
    active by the time the admin confirms, the service refuses and the page shows the new
    difference, to confirm again."""

    def promote(*, version: PolicyVersion, actor: Any, reason: str) -> PolicyVersion:
        return services.policy_version_promote(
            version=version,
            actor=actor,
            reason=reason,
            replaces=_version_number(request.POST.get("replaces")),
        )

    return _version_action(request, number, "promote", promote)


def _compose_context(
    request: ProjectRequest, form: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """The compose page: each skill with its approved revisions and the one selected (the live
    one at first, then what was posted), the adapters used so far, the form's values."""
    project = request.project
    choices, adapters = selectors.compose_choices(project)
    active = selectors.active_version(project)
    if form is None:
        form = {
            "adapter_ref": active.adapter_ref if active else "",
            "base_model": active.base_model if active else "",
            "changelog": "",
            "chosen": {c.skill.pk: c.live_id for c in choices},
        }
    rows = [(c, form["chosen"].get(c.skill.pk)) for c in choices]
    return {"rows": rows, "adapters": adapters, "active": active, "form": form, **extra}


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def version_compose(request: ProjectRequest) -> HttpResponse:
    """Compose a candidate: one approved revision (or none) per skill, an adapter and a base
    model, through ``policy_version_create_candidate`` (as the API's ``POST /versions``).
    Fields: ``skill-<skill id>`` = a revision id or empty (left out)."""
    project = request.project
    if request.method == "GET":
        return render(request, "skills/version_compose.html", _compose_context(request))
    chosen = {
        int(name.removeprefix("skill-")): value
        for name, value in request.POST.items()
        if name.startswith("skill-") and name.removeprefix("skill-").isdigit()
    }
    form = {
        "adapter_ref": request.POST.get("adapter_ref", ""),
        "base_model": request.POST.get("base_model", ""),
        "changelog": request.POST.get("changelog", ""),
        "chosen": {skill: _version_number(value) for skill, value in chosen.items()},
    }
    try:
        version = services.policy_version_create_candidate(
            project=project,
            revisions=selectors.revisions_by_id(project, [v for v in chosen.values() if v]),
            adapter_ref=form["adapter_ref"],
            base_model=form["base_model"],
            changelog=form["changelog"],
            actor=request.user,
        )
    except DomainError as exc:
        context = _compose_context(request, form, error=str(exc))
        return render(request, "skills/version_compose.html", context, status=_error_status(exc))
    messages.success(request, f"Candidate v{version.number} composed; promote it when ready.")
    return redirect("skills:version_detail", project_slug=project.slug, number=version.number)


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def version_rollback(request: ProjectRequest, number: int) -> HttpResponse:
    def rollback(*, version: PolicyVersion, actor: Any, reason: str) -> PolicyVersion:
        return services.policy_version_rollback(to_version=version, actor=actor, reason=reason)

    return _version_action(request, number, "rollback", rollback)


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def version_reject(request: ProjectRequest, number: int) -> HttpResponse:
    return _version_action(request, number, "reject", services.policy_version_reject)


# --- Skills library ------------------------------------------------------------------------------


@require_GET
@project_view()
def skill_library(request: ProjectRequest) -> HttpResponse:
    project = request.project
    q = request.GET.get("q", "").strip()
    page = Paginator(selectors.skills_library(project, q=q or None), LIBRARY_PAGE_SIZE).get_page(
        request.GET.get("page")
    )
    template = "skills/library.html"
    if request.htmx:
        template += "#library"
    return render(request, template, {"page": page, "skills": list(page.object_list), "q": q})
