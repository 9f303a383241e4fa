"""Approvals where reviewers are: signed one-click links, Slack interactions and notifications.

An ``ApprovalRequest`` binds one action (approve or reject a skill revision, promote a candidate
version) on one object to one addressee, behind a single-use, expiring link. Only a SHA-256
hash of the link's token is stored. A *personal* link (addressee set) acts as its addressee,
without a login unless the project requires one; a *channel* link (no addressee: the one posted
to Slack, a webhook or a team mailbox) acts as whoever opens it, who must log in.

Every decision goes through the same services the dashboard uses (``skills.versions.services``);
this module only checks the link and records that it was used. The senders (HTTP, mail) live in
``skills.approvals.delivery``; the Celery tasks that call them in ``skills.approvals.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from base import permissions
from base.errors import Conflict, DomainError, PermissionDenied
from base.models import Membership, Project, Role
from base.services import audit_record
from skills.approvals.models import (
    ApprovalAction,
    ApprovalRequest,
)
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.services import (
    _revision_decided_message,
    _version_decided_message,
    policy_version_promote,
    skill_revision_approve,
    skill_revision_reject,
)

logger = logging.getLogger(__name__)

REQUIRED_ROLE = {
    ApprovalAction.APPROVE_REVISION: Role.REVIEWER,
    ApprovalAction.REJECT_REVISION: Role.REVIEWER,
    ApprovalAction.PROMOTE_VERSION: Role.ADMIN,
}
ROLES_AT_LEAST = {
    Role.REVIEWER: [Role.REVIEWER, Role.ADMIN],
    Role.ADMIN: [Role.ADMIN],
}
CHANNEL_LINK = "channel"
SLACK_RESPONSE_URL_TTL = timedelta(minutes=30)
# Slack keeps a message's response_url usable for 30 minutes.


class LinkRefused(DomainError):
    """An approval link cannot act. ``code`` is one of: unknown, used, expired, changed,
    role_lost, login_required, wrong_user, single_source; ``status`` is the HTTP status a page
    answers with."""

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message, code=code)
        self.status = status


@dataclass(frozen=True)
class ResolvedLink:
    request: ApprovalRequest
    actor: Any  # the User the action will be taken as
    obj: SkillRevision | PolicyVersion


# --- Object state ------------------------------------------------------------------------


def object_state(obj: SkillRevision | PolicyVersion) -> str:
    """A hash of what a reviewer saw. A link made for one state refuses to act on another
    (the revision was edited or decided, the version is no longer the candidate it was).
    A first approval (``require_second_approver``) deliberately leaves it unchanged, so the
    other reviewers' links stay good for the second approval."""
    if isinstance(obj, SkillRevision):
        parts: list[Any] = [
            "revision",
            obj.pk,
            obj.status,
            obj.name,
            obj.description,
            obj.instructions,
            obj.category,
        ]
    else:
        parts = [
            "version",
            obj.pk,
            obj.status,
            obj.adapter_ref,
            obj.base_model,
            sorted(obj.revisions.values_list("pk", flat=True)),
        ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def project_of(obj: SkillRevision | PolicyVersion) -> Project:
    return obj.skill.project if isinstance(obj, SkillRevision) else obj.project


def _check_action_object(
    action: str, revision: SkillRevision | None, version: PolicyVersion | None
) -> SkillRevision | PolicyVersion:
    if action not in REQUIRED_ROLE:
        raise DomainError(f"Unknown action '{action}'.", field="action")
    if action == ApprovalAction.PROMOTE_VERSION:
        if version is None or revision is not None:
            raise DomainError("Promoting needs a policy version.", field="version")
        return version
    if revision is None or version is not None:
        raise DomainError("This action needs a skill revision.", field="revision")
    return revision


def decided_message(obj: SkillRevision | PolicyVersion) -> str | None:
    """Who decided the object and when, if it left its starting state; else None."""
    if isinstance(obj, SkillRevision):
        if obj.status == RevisionStatus.PROPOSED:
            return None
        return _revision_decided_message(obj)
    if obj.status == VersionStatus.CANDIDATE:
        return None
    return _version_decided_message(obj)


# --- Creating requests -------------------------------------------------------------------


def _hash_token(token: str) -> str:
    # Tokens carry 256 bits of randomness, so a fast hash is enough (no KDF needed).
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def approval_request_create(
    *,
    action: str,
    revision: SkillRevision | None = None,
    version: PolicyVersion | None = None,
    addressee: Any = None,
    channel: str = "link",
) -> tuple[ApprovalRequest, str]:
    """A new single-use link for ``action`` on the revision (approve, reject) or the candidate
    version (promote). Returns the request and the token, which is never stored: put it in
    the message now or lose it. ``addressee=None`` makes a channel link (login required)."""
    obj = _check_action_object(action, revision, version)
    project = project_of(obj)
    decided = decided_message(obj)
    if decided:
        raise Conflict(decided)
    role = REQUIRED_ROLE[action]
    if addressee is not None:
        if not permissions.has_role(addressee, project, role):
            raise PermissionDenied(
                f"{addressee.get_username()} does not have the {role} role in {project.name}.",
                field="addressee",
            )
    token = secrets.token_urlsafe(32)
    request = ApprovalRequest.objects.create(
        project=project,
        action=action,
        revision=revision,
        version=version,
        addressee=addressee,
        token_hash=_hash_token(token),
        object_state=object_state(obj),
        expires_at=timezone.now() + timedelta(hours=project.approval_link_ttl_hours),
        channel=channel,
    )
    audit_record(
        action="approval_request.create",
        project=project,
        obj=request,
        after={
            "action": action,
            "object": str(obj),
            "addressee": addressee.get_username() if addressee is not None else None,
            "channel": channel,
        },
    )
    return request, token


def approval_link_url(token: str) -> str:
    return settings.METACLAW_PUBLIC_URL + reverse("approvals:link", kwargs={"token": token})


def eligible_members(project: Project, role: str) -> list[Membership]:
    return list(
        Membership.objects.filter(project=project, role__in=ROLES_AT_LEAST[Role(role)])
        .select_related("user")
        .order_by("user__username")
    )


# --- Resolving and acting ----------------------------------------------------------------


def when_text(value: Any) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _check(request: ApprovalRequest, user: Any) -> ResolvedLink:
    """Every refusal, in the order a person would want to hear it."""
    if request.used_at is not None:
        who = request.decided_by.get_username() if request.decided_by else "someone"
        raise LinkRefused(
            f"This link was already used: {request.outcome or 'decided'} by {who} at "
            f"{when_text(request.used_at)}.",
            code="used",
            status=409,
        )
    if request.expires_at <= timezone.now():
        raise LinkRefused(
            f"This link expired at {when_text(request.expires_at)}. Decide in the dashboard, or "
            "wait for a new notification.",
            code="expired",
            status=410,
        )
    obj: SkillRevision | PolicyVersion
    if request.revision_id is not None:
        obj = SkillRevision.objects.select_related("skill__project").get(pk=request.revision_id)
    else:
        obj = PolicyVersion.objects.select_related("project").get(pk=request.version_id)
    if object_state(obj) != request.object_state:
        decided = decided_message(obj)
        raise LinkRefused(
            decided
            or f"{obj} changed since this link was made; look at it again in the dashboard.",
            code="changed",
            status=409,
        )
    project = request.project
    signed_in = getattr(user, "is_authenticated", False)
    if request.addressee_id is None:
        if not signed_in:
            raise LinkRefused(
                "Log in to decide: this link was shared in a channel, so MetaClaw needs to know "
                "who you are.",
                code="login_required",
                status=403,
            )
        actor = user
    else:
        actor = request.addressee
        if project.approval_links_require_login:
            if not signed_in:
                raise LinkRefused(
                    f"{project.name} requires you to log in as {actor.get_username()} to use "
                    "this link.",
                    code="login_required",
                    status=403,
                )
            if user.pk != actor.pk:
                raise LinkRefused(
                    f"This link was sent to {actor.get_username()}; you are logged in as "
                    f"{user.get_username()}.",
                    code="wrong_user",
                    status=403,
                )
    role = REQUIRED_ROLE[ApprovalAction(request.action)]
    if not permissions.has_role(actor, project, role):
        raise LinkRefused(
            f"{actor.get_username()} no longer has the {role} role in {project.name}, so this "
            "link cannot act.",
            code="role_lost",
            status=403,
        )
    return ResolvedLink(request=request, actor=actor, obj=obj)


def approval_link_resolve(*, token: str, user: Any = None) -> ResolvedLink:
    """The request behind ``token`` and who would act, or ``LinkRefused`` saying why not.
    Reads only: a GET of the link calls this and never acts."""
    request = None
    if token and len(token) <= 200:
        request = (
            ApprovalRequest.objects.select_related("project", "addressee", "decided_by")
            .filter(token_hash=_hash_token(token))
            .first()
        )
    if request is None:
        raise LinkRefused(
            "This link is not valid: it is unknown, or it was altered on the way.",
            code="unknown",
            status=404,
        )
    return _check(request, user)


def chat_approval_refusal(revision: SkillRevision) -> str:
    """Why a chat link or button may not approve ``revision`` ("" when it may): evidence from
    a single source, or from a source marked abusive, is judged on the review page."""
    provenance = revision.provenance_now()
    if provenance.get("single_source"):
        return (
            "This proposal's evidence comes from a single source: approve it on the review "
            "page, where its provenance is shown."
        )
    if provenance.get("abusive"):
        return (
            "This proposal's evidence comes from a source marked abusive: review it on the "
            "review page."
        )
    return ""


def _decide(resolved: ResolvedLink, reason: str) -> str:
    request, actor = resolved.request, resolved.actor
    if request.action == ApprovalAction.APPROVE_REVISION:
        refusal = chat_approval_refusal(resolved.obj)
        if refusal:
            raise LinkRefused(refusal, code="single_source", status=409)
        revision = skill_revision_approve(
            revision=resolved.obj, actor=actor, reason=reason, via_link=True
        )
        return "approved" if revision.status == RevisionStatus.APPROVED else "first approval"
    if request.action == ApprovalAction.REJECT_REVISION:
        skill_revision_reject(revision=resolved.obj, actor=actor, reason=reason)
        return "rejected"
    policy_version_promote(version=resolved.obj, actor=actor, reason=reason)
    return "promoted"


@transaction.atomic
def approval_link_act(*, token: str, user: Any = None, reason: str = "") -> ApprovalRequest:
    """Use the link: check it, take the decision through the dashboard's service, mark it used.

    Single use under concurrency: the request row is locked before the checks, so of two
    simultaneous POSTs the second waits here and then finds ``used_at`` set. A refusal of the
    decision service (a missing reason, a Conflict) rolls everything back, link included."""
    found = approval_link_resolve(token=token, user=user).request
    request = (
        ApprovalRequest.objects.select_for_update(of=("self",))
        .select_related("project", "addressee", "decided_by")
        .get(pk=found.pk)
    )
    resolved = _check(request, user)
    outcome = _decide(resolved, (reason or "").strip())
    request.used_at = timezone.now()
    request.decided_by = resolved.actor
    request.outcome = outcome
    request.save(update_fields=["used_at", "decided_by", "outcome"])
    audit_record(
        action="approval_request.use",
        project=request.project,
        actor=resolved.actor,
        obj=request,
        after={"outcome": outcome, "object": str(resolved.obj), "channel": request.channel},
    )
    return request


# --- Object summaries (pages and messages share them) --------------------------------------


def revision_evidence(revision: SkillRevision) -> dict[str, Any]:
    """How much evidence led to the revision, and one short redacted excerpt of it."""
    from base.redaction import redact_text

    incidents = revision.source_incidents.order_by("-received_at")
    count = incidents.count()
    groups = list(revision.source_groups.all())
    events = sum(g.event_count for g in groups)
    excerpt = ""
    first = incidents.first()
    if first is not None:
        excerpt = first.error_message or first.feedback_text
    elif groups:
        excerpt = groups[0].title
    # Sent to Slack, webhooks and e-mail: personal data masked as well as secrets.
    excerpt, _ = redact_text(excerpt[:300], personal_data=True)
    provenance = revision.provenance_now()
    return {
        "incidents": count,
        "groups": len(groups),
        "events": events,
        "count": max(count, events),
        "excerpt": excerpt[:240],
        # Sent to Slack, webhooks and e-mail: how many sources, never who they are.
        "provenance": {**provenance, "abusive": len(provenance.get("abusive", []))},
    }


def provenance_note(provenance: dict[str, Any]) -> str:
    """The title's note on where the evidence came from: a single source, or how many."""
    if not provenance or "sources" not in provenance:
        return ""
    if provenance.get("single_source"):
        note = " · single source (approve on the review page)"
    else:
        note = (
            f" · {provenance['sources']} sources: {provenance['sessions']} session(s), "
            f"{provenance['end_users']} end user(s), {provenance['agents']} agent(s), "
            f"{provenance['api_keys']} API key(s)"
        )
    if provenance.get("abusive"):
        note += " · evidence from a source marked abusive"
    return note


def version_diff(version: PolicyVersion) -> dict[str, Any]:
    """What promoting ``version`` would change against the active version."""
    active = (
        PolicyVersion.objects.filter(project_id=version.project_id, status=VersionStatus.ACTIVE)
        .prefetch_related("revisions__skill")
        .first()
    )
    new = {r.skill.slug: r for r in version.revisions.select_related("skill")}
    old = {r.skill.slug: r for r in active.revisions.all()} if active else {}
    return {
        "active": active,
        "added": [new[s] for s in sorted(new.keys() - old.keys())],
        "removed": [old[s] for s in sorted(old.keys() - new.keys())],
        "changed": [
            (old[s], new[s]) for s in sorted(new.keys() & old.keys()) if old[s].pk != new[s].pk
        ],
        "adapter_from": active.adapter_ref if active else "",
        "adapter_to": version.adapter_ref,
        "base_model_from": active.base_model if active else "",
        "base_model_to": version.base_model,
    }
