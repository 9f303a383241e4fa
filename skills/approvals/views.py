"""Pages for approvals where reviewers are: the one-click link, Slack's interactivity endpoint
and identity linking, and the project's integration settings. Thin:
``skills.approvals`` (links, notifications, slack) holds the rules."""

from __future__ import annotations

import hmac
import json
import logging

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_POST

from base.decorators import project_view
from base.errors import DomainError
from base.models import Membership, Role
from base.requests import ProjectRequest
from skills.approvals import links, notifications, selectors, slack
from skills.approvals.models import ApprovalAction
from skills.library.models import SkillRevision

logger = logging.getLogger(__name__)

ACTION_LABELS = {
    ApprovalAction.APPROVE_REVISION: ("Approve", "primary"),
    ApprovalAction.REJECT_REVISION: ("Reject", "danger"),
    ApprovalAction.PROMOTE_VERSION: ("Promote", "primary"),
}


def _refused(request: HttpRequest, exc: links.LinkRefused) -> HttpResponse:
    login_url = None
    if exc.code in {"login_required", "wrong_user"}:
        login_url = f"{reverse('login')}?next={request.path}"
    return render(
        request,
        "skills/approvals/refused.html",
        {"message": str(exc), "code": exc.code, "login_url": login_url},
        status=exc.status,
    )


def _confirm_context(resolved: links.ResolvedLink) -> dict:
    obj = resolved.obj
    label, style = ACTION_LABELS[ApprovalAction(resolved.request.action)]
    context = {
        "resolved": resolved,
        "approval": resolved.request,
        "actor": resolved.actor,
        "label": label,
        "style": style,
        "needs_reason": resolved.request.action == ApprovalAction.REJECT_REVISION,
    }
    if isinstance(obj, SkillRevision):
        context.update(revision=obj, evidence=links.revision_evidence(obj))
    else:
        context.update(version=obj, diff=links.version_diff(obj))
    return context


@require_http_methods(["GET", "POST"])
def link(request: HttpRequest, token: str) -> HttpResponse:
    """GET shows what the link would do (mail and chat scanners prefetch GETs, so a GET never
    acts); POST acts through the same service as the dashboard."""
    try:
        resolved = links.approval_link_resolve(token=token, user=request.user)
    except links.LinkRefused as exc:
        if exc.code == "login_required" and request.method == "GET":
            return redirect_to_login(request.get_full_path())
        return _refused(request, exc)
    template = "skills/approvals/link.html"
    if request.method == "GET":
        return render(request, template, _confirm_context(resolved))
    reason = request.POST.get("reason", "")
    try:
        used = links.approval_link_act(token=token, user=request.user, reason=reason)
    except links.LinkRefused as exc:
        return _refused(request, exc)
    except DomainError as exc:
        if exc.field:  # a missing reason: the form again, the link still unused
            context = _confirm_context(resolved) | {"error": str(exc), "reason": reason}
            return render(request, template, context, status=422)
        return _refused(request, links.LinkRefused(str(exc), code=exc.code, status=409))
    obj = resolved.obj
    obj.refresh_from_db()
    return render(
        request,
        "skills/approvals/done.html",
        {"approval": used, "obj": obj, "actor": resolved.actor},
    )


@csrf_exempt
@require_POST
def slack_interactions(request: HttpRequest) -> HttpResponse:
    """Slack's interactivity request URL. Verifies the signature, stores the click once and
    answers at once (Slack wants an answer within 3 s); a task does the work.

    The signature is checked over the raw body before the payload is parsed: the secrets to
    try come from a light scan of the raw body (our button value's project id, never a JSON
    parse) and the site-wide secret, so an unsigned body costs no JSON parsing."""
    raw_body = request.body
    form = QueryDict(raw_body, encoding="utf-8")
    raw_payload = form.get("payload", "")
    verified_secret = slack.slack_signature_secret(
        raw_payload=raw_payload,
        body=raw_body,
        timestamp=request.headers.get("X-Slack-Request-Timestamp"),
        signature=request.headers.get("X-Slack-Signature"),
    )
    if verified_secret is None:
        return JsonResponse({"detail": "Invalid or stale Slack signature."}, status=401)
    try:
        payload = json.loads(raw_payload)
        if not isinstance(payload, dict):
            raise ValueError("payload is not an object")
        project, secret = slack.slack_signing_secret_for(payload)
    except (ValueError, RecursionError):
        return JsonResponse({"detail": "Expected a form field 'payload' with JSON."}, status=400)
    if not hmac.compare_digest(secret.encode(), verified_secret.encode()):
        # Signed with another project's secret than the one the payload names.
        return JsonResponse({"detail": "Invalid or stale Slack signature."}, status=401)
    _, created = slack.slack_interaction_record(
        project=project, raw_payload=raw_payload, payload=payload
    )
    if not created:
        logger.info(
            "Slack redelivered an interaction (retry %s); not acting again.",
            request.headers.get("X-Slack-Retry-Num", "?"),
        )
    return HttpResponse(status=200)


def _slack_link_refused(request: HttpRequest, exc: DomainError, *, status: int) -> HttpResponse:
    return render(
        request,
        "skills/approvals/refused.html",
        {"message": str(exc), "code": exc.code},
        status=status,
    )


@require_http_methods(["GET", "POST"])
@login_required
def slack_link(request: HttpRequest, signed: str) -> HttpResponse:
    """Link the Slack user a signed URL names to the logged-in member (like ``/sentry link``)."""
    try:
        project, slack_user_id = slack.slack_link_resolve(signed=signed)
    except DomainError as exc:
        return _slack_link_refused(request, exc, status=400)
    membership = Membership.objects.filter(project=project, user=request.user).first()
    context = {"project": project, "slack_user_id": slack_user_id, "membership": membership}
    if request.method == "POST":
        try:
            slack.membership_link_slack(
                project=project, user=request.user, slack_user_id=slack_user_id
            )
        except DomainError as exc:
            return _slack_link_refused(request, exc, status=403)
        context["linked"] = True
    return render(request, "skills/approvals/slack_link.html", context)


def _integrations_context(request: ProjectRequest) -> dict:
    project = request.project
    return {
        "project": project,
        "deliveries": selectors.notifications_for_project(project)[:20],
        "linked_members": Membership.objects.filter(project=project)
        .exclude(slack_user_id="")
        .select_related("user"),
        "interactions_url": settings.METACLAW_PUBLIC_URL + reverse("approvals:slack_interactions"),
    }


@require_http_methods(["GET", "POST"])
@project_view(Role.ADMIN)
def integrations(request: ProjectRequest) -> HttpResponse:
    project = request.project
    template = "skills/approvals/integrations.html"
    if request.method == "GET":
        if request.headers.get("HX-Request") and request.GET.get("part") == "deliveries":
            template += "#deliveries"
        return render(request, template, _integrations_context(request))
    post = request.POST
    try:
        notifications.project_integrations_update(
            project=project,
            actor=request.user,
            slack_webhook_url=post.get("slack_webhook_url", ""),
            webhook_url=post.get("webhook_url", ""),
            notify_emails=post.get("notify_emails", ""),
            approval_link_ttl_hours=_int(post.get("approval_link_ttl_hours"), 0),
            approval_links_require_login=post.get("approval_links_require_login") == "on",
            slack_signing_secret=_secret(post, "slack_signing_secret"),
            webhook_secret=_secret(post, "webhook_secret"),
        )
    except DomainError as exc:
        context = _integrations_context(request) | {"error": str(exc), "error_field": exc.field}
        return render(request, template, context, status=422)
    messages.success(request, "Integration settings saved.")
    return redirect("approvals:integrations", project_slug=project.slug)


@require_POST
@project_view(Role.ADMIN)
def integrations_test(request: ProjectRequest) -> HttpResponse:
    project = request.project
    try:
        sent = notifications.integrations_send_test(project=project, actor=request.user)
    except DomainError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request,
            f"Test message queued for {len(sent)} channel(s); their delivery shows below.",
        )
    return redirect("approvals:integrations", project_slug=project.slug)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value or "")
    except ValueError:
        return default


def _secret(post: QueryDict, name: str) -> str | None:
    """Write-only secrets: an empty field keeps the stored one; the clear box empties it."""
    if post.get(f"clear_{name}") == "on":
        return ""
    value = post.get(name, "").strip()
    return value or None
