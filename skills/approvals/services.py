"""Approvals where reviewers are: signed one-click links, Slack interactions and notifications.

An ``ApprovalRequest`` binds one action (approve or reject a skill revision, promote a candidate
version) on one object to one addressee, behind a single-use, expiring link. Only a SHA-256
hash of the link's token is stored. A *personal* link (addressee set) acts as its addressee,
without a login unless the project requires one; a *channel* link (no addressee: the one posted
to Slack, a webhook or a team mailbox) acts as whoever opens it, who must log in.

Every decision goes through the same services the dashboard uses (``skills.versions.services``);
this module only checks the link and records that it was used. The senders (HTTP, mail) live in
``skills.approvals.notify``; the Celery tasks that call them in ``skills.approvals.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from django.conf import settings
from django.core import signing
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_email
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from base.models import Membership, Project, Role
from base.queue import enqueue, enqueue_on_commit
from base.selectors import membership_for
from base.services import Conflict, DomainError, NotFound, PermissionDenied, audit_record
from base.sql import placeholders
from skills.approvals import notify
from skills.approvals.models import (
    ApprovalAction,
    ApprovalRequest,
    InteractionStatus,
    Notification,
    NotificationChannel,
    NotificationKind,
    NotificationStatus,
    SlackInteraction,
)
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, Release, VersionStatus
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
SLACK_LINK_SALT = "metaclaw.slack-link"
SLACK_LINK_MAX_AGE = 24 * 3600
# Slack keeps a message's response_url usable for 30 minutes.
SLACK_RESPONSE_URL_TTL = timedelta(minutes=30)


class LinkRefused(DomainError):
    """An approval link cannot act. ``code`` is one of: unknown, used, expired, changed,
    role_lost, login_required, wrong_user; ``status`` is the HTTP status a page answers with."""

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


def _project_of(obj: SkillRevision | PolicyVersion) -> Project:
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


def _decided_message(obj: SkillRevision | PolicyVersion) -> str | None:
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
    project = _project_of(obj)
    decided = _decided_message(obj)
    if decided:
        raise Conflict(decided)
    role = REQUIRED_ROLE[action]
    if addressee is not None:
        membership = membership_for(user=addressee, project=project)
        if membership is None or not membership.has_role(role):
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


def _when(value: Any) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _check(request: ApprovalRequest, user: Any) -> ResolvedLink:
    """Every refusal, in the order a person would want to hear it."""
    if request.used_at is not None:
        who = request.decided_by.get_username() if request.decided_by else "someone"
        raise LinkRefused(
            f"This link was already used: {request.outcome or 'decided'} by {who} at "
            f"{_when(request.used_at)}.",
            code="used",
            status=409,
        )
    if request.expires_at <= timezone.now():
        raise LinkRefused(
            f"This link expired at {_when(request.expires_at)}. Decide in the dashboard, or "
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
        decided = _decided_message(obj)
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
    membership = membership_for(user=actor, project=project)
    if membership is None or not membership.has_role(role):
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


def _decide(resolved: ResolvedLink, reason: str) -> str:
    request, actor = resolved.request, resolved.actor
    if request.action == ApprovalAction.APPROVE_REVISION:
        revision = skill_revision_approve(revision=resolved.obj, actor=actor, reason=reason)
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
    excerpt, _ = redact_text(excerpt[:300])
    return {
        "incidents": count,
        "groups": len(groups),
        "events": events,
        "count": max(count, events),
        "excerpt": excerpt[:240],
    }


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


# --- Notifications -----------------------------------------------------------------------


def _enqueue(notification_ids: list[int]) -> None:
    enqueue_on_commit("skills.tasks.send_notification", *[(nid,) for nid in notification_ids])


def _team_emails(project: Project) -> list[str]:
    return [line.strip() for line in project.notify_emails.splitlines() if line.strip()]


def _actions_for(obj: SkillRevision | PolicyVersion) -> list[str]:
    if isinstance(obj, SkillRevision):
        return [ApprovalAction.APPROVE_REVISION, ApprovalAction.REJECT_REVISION]
    return [ApprovalAction.PROMOTE_VERSION]


def _links_for(obj: SkillRevision | PolicyVersion, *, addressee: Any, channel: str) -> dict:
    links = {}
    for action in _actions_for(obj):
        kwargs = {"revision": obj} if isinstance(obj, SkillRevision) else {"version": obj}
        _, token = approval_request_create(
            action=action, addressee=addressee, channel=channel, **kwargs
        )
        links[action] = approval_link_url(token)
    return links


def _summary(obj: SkillRevision | PolicyVersion) -> notify.Summary:
    project = _project_of(obj)
    if isinstance(obj, SkillRevision):
        return notify.Summary(
            project_name=project.name,
            kind="revision",
            object_id=obj.pk,
            project_id=project.pk,
            state=object_state(obj)[:16],
            title=f"Skill proposal: {obj.name}",
            revision=obj,
            evidence=revision_evidence(obj),
        )
    return notify.Summary(
        project_name=project.name,
        kind="version",
        object_id=obj.pk,
        project_id=project.pk,
        state=object_state(obj)[:16],
        title=f"Candidate policy v{obj.number}",
        version=obj,
        diff=version_diff(obj),
    )


def _slack_interactive(project: Project) -> bool:
    return bool(project.slack_signing_secret or settings.SLACK_SIGNING_SECRET)


def _slack_webhook(project: Project) -> str:
    return project.slack_webhook_url or settings.SLACK_WEBHOOK_URL


def approval_notify(
    *, revision: SkillRevision | None = None, version: PolicyVersion | None = None
) -> list[Notification]:
    """Tell the reviewers that ``revision`` (proposed) or ``version`` (candidate) awaits them:
    personal links by e-mail to each member with the right role and an address, channel links
    to Slack, the webhook and the team mailboxes. Rows first, sending after commit."""
    obj: SkillRevision | PolicyVersion = revision if revision is not None else version
    if obj is None:
        raise DomainError("Nothing to notify about.", field="revision")
    if not _anyone_to_notify(obj):
        return []  # the fast loop's common case without channels: one small read, no reload
    if isinstance(obj, SkillRevision):
        obj = SkillRevision.objects.select_related("skill__project").get(pk=obj.pk)
    else:
        obj = PolicyVersion.objects.select_related("project").get(pk=obj.pk)
    if _decided_message(obj):
        return []
    project = _project_of(obj)
    role = REQUIRED_ROLE[_actions_for(obj)[0]]
    target = {"revision": obj} if isinstance(obj, SkillRevision) else {"version": obj}
    slack_url, team = _slack_webhook(project), _team_emails(project)
    members = [
        m for m in eligible_members(project, role) if m.user.email and m.user.email not in team
    ]
    if not (slack_url or project.webhook_url or team or members):
        return []  # nobody to tell: no summary to build (it costs queries on the fast loop)
    with transaction.atomic():
        return _approval_notify_rows(obj, project, target, slack_url, team, members)


def _anyone_to_notify(obj: SkillRevision | PolicyVersion) -> bool:
    """Whether the project has a channel, or a member who may decide ``obj`` and has an
    address, as stored now. One written-out query: the fast loop asks this for every proposal,
    and the ORM's two queries cost it more CPU than the rest of the notifying."""
    if settings.SLACK_WEBHOOK_URL:
        return True
    project_id = obj.skill.project_id if isinstance(obj, SkillRevision) else obj.project_id
    roles = sorted(r.value for r in ROLES_AT_LEAST[Role(REQUIRED_ROLE[_actions_for(obj)[0]])])
    user = Membership.user.field.related_model._meta
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT p.slack_webhook_url, p.webhook_url, p.notify_emails, EXISTS ("
            f"SELECT 1 FROM {Membership._meta.db_table} m "
            f"JOIN {user.db_table} u ON u.{user.pk.column} = m.user_id "
            f"WHERE m.project_id = p.id AND m.role IN ({placeholders(roles)}) "
            f"AND u.email <> '') FROM {Project._meta.db_table} p WHERE p.id = %s",
            [*roles, project_id],
        )
        row = cursor.fetchone()
    if row is None:
        return False
    slack_url, webhook_url, team, member = row
    return bool(slack_url.strip() or webhook_url.strip() or team.strip() or member)


def _approval_notify_rows(
    obj: SkillRevision | PolicyVersion,
    project: Project,
    target: dict[str, Any],
    slack_url: str,
    team: list[str],
    members: list[Membership],
) -> list[Notification]:
    summary = _summary(obj)
    rows: list[Notification] = []

    def add(channel: str, recipient: str, payload: dict) -> None:
        rows.append(
            Notification.objects.create(
                project=project,
                channel=channel,
                kind=NotificationKind.APPROVAL_REQUEST,
                recipient=recipient[:300],
                payload=payload,
                **target,
            )
        )

    channel_links = (
        _links_for(obj, addressee=None, channel=CHANNEL_LINK)
        if slack_url or project.webhook_url or team
        else {}
    )
    if slack_url:
        message = notify.slack_approval_message(
            summary, channel_links, interactive=_slack_interactive(project)
        )
        add(NotificationChannel.SLACK, "Slack webhook", {"mode": "webhook", "body": message})
    if project.webhook_url:
        body = notify.webhook_event("approval.requested", summary, channel_links)
        add(NotificationChannel.WEBHOOK, notify.host_of(project.webhook_url), {"body": body})
    for address in team:
        mail = notify.approval_email(summary, channel_links, personal=False)
        add(NotificationChannel.EMAIL, address, {**mail, "to": [address]})
    for membership in members:
        address = membership.user.email
        links = _links_for(obj, addressee=membership.user, channel="email")
        mail = notify.approval_email(summary, links, personal=True)
        add(NotificationChannel.EMAIL, address, {**mail, "to": [address]})
    _enqueue([n.pk for n in rows])
    return rows


@transaction.atomic
def approval_decision_notify(
    *, revision: SkillRevision | None = None, version: PolicyVersion | None = None
) -> list[Notification]:
    """Let the channels that were asked see who decided: the Slack message is updated in place
    through its response_url when someone clicked it recently, else a follow-up is posted;
    the webhook receives an ``approval.decided`` event."""
    asked = Notification.objects.filter(
        kind=NotificationKind.APPROVAL_REQUEST,
        **({"revision": revision} if revision is not None else {"version": version}),
    )
    announced = Notification.objects.filter(
        kind=NotificationKind.DECISION,
        **({"revision": revision} if revision is not None else {"version": version}),
    )
    # A decision is announced once (a later rollback to this version is not a new decision).
    if not asked.exists() or announced.exists():
        return []
    obj: SkillRevision | PolicyVersion = revision if revision is not None else version
    obj.refresh_from_db()
    project = _project_of(obj)
    decided = _decision_line(obj)
    summary = _summary(obj)
    target = {"revision": revision} if revision is not None else {"version": version}
    rows = []
    slack = asked.filter(channel=NotificationChannel.SLACK).order_by("-id").first()
    if slack is not None:
        fresh = (
            slack.slack_response_url
            and slack.slack_response_url_at
            and timezone.now() - slack.slack_response_url_at < SLACK_RESPONSE_URL_TTL
        )
        message = notify.slack_decided_message(summary, decided)
        payload = (
            {"mode": "response_url", "url": slack.slack_response_url, "body": message}
            if fresh
            else {"mode": "webhook", "body": message}
        )
        rows.append(
            Notification.objects.create(
                project=project,
                channel=NotificationChannel.SLACK,
                kind=NotificationKind.DECISION,
                recipient="Slack message" if fresh else "Slack webhook",
                payload=payload,
                **target,
            )
        )
    if project.webhook_url and asked.filter(channel=NotificationChannel.WEBHOOK).exists():
        body = notify.webhook_event("approval.decided", summary, {}, decision=decided)
        rows.append(
            Notification.objects.create(
                project=project,
                channel=NotificationChannel.WEBHOOK,
                kind=NotificationKind.DECISION,
                recipient=notify.host_of(project.webhook_url),
                payload={"body": body},
                **target,
            )
        )
    _enqueue([n.pk for n in rows])
    return rows


def _decision_line(obj: SkillRevision | PolicyVersion) -> str:
    if isinstance(obj, SkillRevision):
        return _revision_decided_message(obj)
    release = Release.objects.filter(to_version=obj).order_by("-created_at", "-id").first()
    if release is not None and obj.status == VersionStatus.ACTIVE:
        return (
            f"v{obj.number} was promoted by {release.actor_label or 'someone'} at "
            f"{_when(release.created_at)}."
        )
    return _version_decided_message(obj)


@transaction.atomic
def integrations_send_test(*, project: Project, actor: Any) -> list[Notification]:
    """A test message to every configured channel; the settings page shows how each went."""
    _require_admin(actor, project)
    rows = []
    text = f"MetaClaw test message for {project.name}, sent by {actor.get_username()}."
    if _slack_webhook(project):
        rows.append((NotificationChannel.SLACK, "Slack webhook", notify.slack_text_message(text)))
    if project.webhook_url:
        body = {"event": "test", "project": project.slug, "text": text}
        rows.append((NotificationChannel.WEBHOOK, notify.host_of(project.webhook_url), body))
    for address in _team_emails(project):
        rows.append((NotificationChannel.EMAIL, address, {"to": [address]}))
    if not rows:
        raise DomainError("Configure a Slack webhook, a webhook or an e-mail address first.")
    created = []
    for channel, recipient, body in rows:
        if channel == NotificationChannel.EMAIL:
            payload = {"subject": "MetaClaw test message", "text": text, **body}
        elif channel == NotificationChannel.SLACK:
            payload = {"mode": "webhook", "body": body}
        else:
            payload = {"body": body}
        created.append(
            Notification.objects.create(
                project=project,
                channel=channel,
                kind=NotificationKind.TEST,
                recipient=recipient,
                payload=payload,
            )
        )
    audit_record(
        action="integrations.test", project=project, actor=actor, after={"messages": len(created)}
    )
    _enqueue([n.pk for n in created])
    return created


# Delivery bookkeeping, called by the ``send_notification`` task around each attempt.


def notification_claim(*, notification_id: int) -> Notification | None:
    """PENDING/RETRYING → SENDING for exactly one worker; None if someone else has it or it
    is done (a redelivered task message, a sweep that raced the first enqueue)."""
    claimed = Notification.objects.filter(
        pk=notification_id,
        status__in=[NotificationStatus.PENDING, NotificationStatus.RETRYING],
    ).update(
        status=NotificationStatus.SENDING, attempts=F("attempts") + 1, claimed_at=timezone.now()
    )
    if claimed != 1:
        return None
    return Notification.objects.select_related("project").get(pk=notification_id)


def notification_mark_sent(*, notification_id: int) -> None:
    notification = Notification.objects.get(pk=notification_id)
    notification.status = NotificationStatus.SENT
    notification.sent_at = timezone.now()
    notification.last_error = ""
    # The one-time links have done their job once delivered; keep no usable copy at rest.
    notification.payload = notify.strip_tokens(notification.payload)
    notification.save(update_fields=["status", "sent_at", "last_error", "payload"])


def notification_fail(*, notification_id: int, error: str, final: bool) -> None:
    """Record a failed attempt; ``final`` marks it FAILED for good (shown on the settings
    page and the object), otherwise RETRYING until the task's next attempt."""
    notification = Notification.objects.select_related("project").get(pk=notification_id)
    notification.status = NotificationStatus.FAILED if final else NotificationStatus.RETRYING
    notification.last_error = error[:2000]
    fields = ["status", "last_error"]
    if final:
        notification.payload = notify.strip_tokens(notification.payload)
        fields.append("payload")
    notification.save(update_fields=fields)
    if final:
        audit_record(
            action="notification.failed",
            project=notification.project,
            obj=notification,
            after={"channel": notification.channel, "attempts": notification.attempts},
            message=error[:500],
        )


def notifications_pending(*, older_than_seconds: int) -> list[int]:
    """Rows whose task message was lost: PENDING ones (the broker was down at commit), and
    SENDING or RETRYING ones whose worker died or whose retry message vanished. Those are put
    back to RETRYING so that a new task can claim them."""
    now = timezone.now()
    # A live attempt is killed by the task time limit, so twice that is safely dead.
    stale = now - timedelta(seconds=max(older_than_seconds, 2 * settings.CELERY_TASK_TIME_LIMIT))
    Notification.objects.filter(
        status__in=[NotificationStatus.SENDING, NotificationStatus.RETRYING], claimed_at__lt=stale
    ).update(status=NotificationStatus.RETRYING, claimed_at=now)
    cutoff = now - timedelta(seconds=older_than_seconds)
    return list(
        Notification.objects.filter(
            Q(status=NotificationStatus.PENDING, created_at__lt=cutoff)
            | Q(status=NotificationStatus.RETRYING, claimed_at=now)
        ).values_list("pk", flat=True)[:500]
    )


# --- Project integration settings --------------------------------------------------------


def _require_admin(actor: Any, project: Project) -> None:
    membership = membership_for(user=actor, project=project)
    if membership is None or not membership.has_role(Role.ADMIN):
        raise PermissionDenied(f"This needs the admin role in {project.name}.")


def _clean_url(value: str, field: str) -> str:
    value = (value or "").strip()
    if not value:
        return ""
    try:
        URLValidator(schemes=["http", "https"])(value)
    except ValidationError as exc:
        raise DomainError("Enter a valid http(s) URL.", field=field) from exc
    if len(value) > 200:
        raise DomainError("The URL is longer than 200 characters.", field=field)
    refusal = notify.url_refusal(value)
    if refusal is not None:
        raise DomainError(refusal, field=field)
    return value


@transaction.atomic
def project_integrations_update(
    *,
    project: Project,
    actor: Any,
    slack_webhook_url: str,
    webhook_url: str,
    notify_emails: str,
    approval_link_ttl_hours: int,
    approval_links_require_login: bool,
    slack_signing_secret: str | None = None,
    webhook_secret: str | None = None,
) -> Project:
    """Save the integration settings. Secrets are write-only: ``None`` keeps the stored one,
    an empty string clears it. The audit log names what changed, never a secret's value."""
    _require_admin(actor, project)
    project = Project.objects.select_for_update().get(pk=project.pk)
    emails = []
    for line in (notify_emails or "").splitlines():
        if line.strip():
            try:
                validate_email(line.strip())
            except ValidationError as exc:
                raise DomainError(
                    f"'{line.strip()}' is not an e-mail address.", field="notify_emails"
                ) from exc
            emails.append(line.strip())
    if not 1 <= int(approval_link_ttl_hours) <= 24 * 30:
        raise DomainError(
            "Links must expire after 1 to 720 hours.", field="approval_link_ttl_hours"
        )
    values: dict[str, Any] = {
        "slack_webhook_url": _clean_url(slack_webhook_url, "slack_webhook_url"),
        "webhook_url": _clean_url(webhook_url, "webhook_url"),
        "notify_emails": "\n".join(emails),
        "approval_link_ttl_hours": int(approval_link_ttl_hours),
        "approval_links_require_login": bool(approval_links_require_login),
    }
    if slack_signing_secret is not None:
        values["slack_signing_secret"] = slack_signing_secret.strip()[:200]
    if webhook_secret is not None:
        values["webhook_secret"] = webhook_secret.strip()[:200]
    changed = [name for name, value in values.items() if getattr(project, name) != value]
    for name in changed:
        setattr(project, name, values[name])
    if changed:
        project.save(update_fields=changed)
        audit_record(
            action="project.integrations_update",
            project=project,
            actor=actor,
            obj=project,
            after={"changed": changed},
        )
    return project


# --- Slack: identity linking and interactions ----------------------------------------------


def slack_link_token(*, project: Project, slack_user_id: str, slack_team_id: str = "") -> str:
    return signing.dumps(
        {"p": project.pk, "u": slack_user_id, "t": slack_team_id}, salt=SLACK_LINK_SALT
    )


def slack_link_url(*, project: Project, slack_user_id: str, slack_team_id: str = "") -> str:
    signed = slack_link_token(
        project=project, slack_user_id=slack_user_id, slack_team_id=slack_team_id
    )
    return settings.METACLAW_PUBLIC_URL + reverse("approvals:slack_link", kwargs={"signed": signed})


def slack_link_resolve(*, signed: str) -> tuple[Project, str]:
    """The project and Slack user id a linking URL names; DomainError if forged or old."""
    try:
        data = signing.loads(signed, salt=SLACK_LINK_SALT, max_age=SLACK_LINK_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise DomainError(
            "This linking link expired; click a button in Slack again.", code="expired"
        ) from exc
    except signing.BadSignature as exc:
        raise DomainError("This linking link is not valid.", code="unknown") from exc
    project = Project.objects.filter(pk=data.get("p")).first()
    if project is None or not data.get("u"):
        raise NotFound("This linking link is not valid.")
    return project, str(data["u"])


@transaction.atomic
def membership_link_slack(*, project: Project, user: Any, slack_user_id: str) -> Membership:
    """Link a Slack user id to the user's membership (Sentry's ``/sentry link``). One Slack
    user maps to one member per project: an older link of the same id is removed."""
    membership = (
        Membership.objects.select_for_update().filter(project=project, user=user).first()
        if getattr(user, "is_authenticated", False)
        else None
    )
    if membership is None:
        raise PermissionDenied(f"You are not a member of {project.name}.")
    Membership.objects.filter(project=project, slack_user_id=slack_user_id).exclude(
        pk=membership.pk
    ).update(slack_user_id="")
    before = membership.slack_user_id
    membership.slack_user_id = slack_user_id
    membership.save(update_fields=["slack_user_id"])
    audit_record(
        action="membership.link_slack",
        project=project,
        actor=user,
        obj=membership,
        before={"slack_user_id": before},
        after={"slack_user_id": slack_user_id},
    )
    return membership


# Our button value ({"p":<project id>,...}) as it appears JSON-encoded inside the payload.
_PROJECT_IN_PAYLOAD = re.compile(r'\\"p\\"\s*:\s*(\d{1,9})\b')


def slack_signature_secret(
    *, raw_payload: str, body: bytes, timestamp: str | None, signature: str | None
) -> str | None:
    """The secret that verifies a Slack request's signature over its raw ``body``, or None.
    Tried: the secrets of the (at most three) projects our button values in the raw payload
    name, found by a bounded scan (no JSON parsing of unverified input), then the site-wide
    secret. The caller still checks that the verified payload names a project with this
    secret."""
    if not timestamp or not signature:
        return None
    ids: list[int] = []
    for match in _PROJECT_IN_PAYLOAD.finditer(raw_payload or ""):
        project_id = int(match.group(1))
        if project_id not in ids:
            ids.append(project_id)
        if len(ids) == 3:
            break
    candidates = [
        secret
        for secret in Project.objects.filter(pk__in=ids)
        .exclude(slack_signing_secret="")
        .values_list("slack_signing_secret", flat=True)
    ]
    if settings.SLACK_SIGNING_SECRET:
        candidates.append(settings.SLACK_SIGNING_SECRET)
    for secret in candidates:
        if notify.slack_signature_valid(
            secret=secret, body=body, timestamp=timestamp, signature=signature
        ):
            return secret
    return None


def slack_signing_secret_for(payload: dict) -> tuple[Project | None, str]:
    """The project a Slack payload names (through our button's value) and the secret to verify
    it with. The payload is untrusted until verified; a forged project id only picks a secret
    the forger does not know."""
    project = None
    try:
        value = json.loads(payload["actions"][0]["value"])
        project = Project.objects.filter(pk=int(value["p"])).first()
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        project = None
    secret = (project.slack_signing_secret if project else "") or settings.SLACK_SIGNING_SECRET
    return project, secret


def slack_interaction_record(
    *, project: Project | None, raw_payload: str, payload: dict
) -> tuple[SlackInteraction, bool]:
    """Store a verified interaction once. Slack's retries (``X-Slack-Retry-Num``) and duplicate
    deliveries carry the same payload, hence the same key: they only count a delivery.
    Returns the row and whether it is new (only a new row gets processed)."""
    key = hashlib.sha256(raw_payload.encode()).hexdigest()
    action = (payload.get("actions") or [{}])[0]
    try:
        with transaction.atomic():
            interaction = SlackInteraction.objects.create(
                project=project,
                dedupe_key=key,
                slack_user_id=str((payload.get("user") or {}).get("id", ""))[:64],
                slack_team_id=str((payload.get("team") or {}).get("id", ""))[:64],
                action_id=str(action.get("action_id", ""))[:100],
                payload=payload,
                response_url=str(payload.get("response_url", ""))[:1000],
            )
    except IntegrityError:
        SlackInteraction.objects.filter(dedupe_key=key).update(deliveries=F("deliveries") + 1)
        return SlackInteraction.objects.get(dedupe_key=key), False
    if interaction.action_id in notify.SLACK_ACTIONS:
        transaction.on_commit(lambda: _enqueue_interaction(interaction.pk))
    else:
        # URL buttons (Open, or links when interactivity is off) also reach us; nothing to do.
        SlackInteraction.objects.filter(pk=interaction.pk).update(
            status=InteractionStatus.DONE, processed_at=timezone.now(), result="ignored"
        )
    return interaction, True


def _enqueue_interaction(interaction_id: int) -> None:
    enqueue("skills.tasks.process_slack_interaction", interaction_id)


@dataclass(frozen=True)
class SlackReply:
    response_url: str
    body: dict


def _slack_refuse(interaction: SlackInteraction, text: str) -> SlackReply:
    interaction.status = InteractionStatus.REFUSED
    interaction.result = text[:2000]
    interaction.processed_at = timezone.now()
    interaction.save(update_fields=["status", "result", "processed_at"])
    return SlackReply(interaction.response_url, notify.slack_ephemeral(text))


# Slack accepts replies through a response_url for 30 minutes; a click older than that is not
# acted on any more.
SLACK_INTERACTION_MAX_AGE = timedelta(minutes=30)


def slack_interaction_handle(*, interaction_id: int) -> SlackReply | None:
    """Act on one button click, at most once: claim the row (RECEIVED → PROCESSING), map the
    Slack user to a member, check that the message still shows the object as it is, and call
    the same decision service as the dashboard. Returns what to tell the clicker (ephemeral),
    or None when the decision itself updates the message (``approval_decision_notify``)."""
    # A click older than Slack's response window is not acted on (the sweep marks it FAILED).
    claimed = SlackInteraction.objects.filter(
        pk=interaction_id,
        status=InteractionStatus.RECEIVED,
        created_at__gte=timezone.now() - SLACK_INTERACTION_MAX_AGE,
    ).update(status=InteractionStatus.PROCESSING)
    if claimed != 1:
        return None
    interaction = SlackInteraction.objects.select_related("project").get(pk=interaction_id)
    payload = interaction.payload
    project = interaction.project
    try:
        value = json.loads(payload["actions"][0]["value"])
        kind, object_id, state = value["k"], int(value["id"]), str(value["s"])
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        return _slack_refuse(interaction, "MetaClaw did not recognise this button.")
    if project is None:
        return _slack_refuse(interaction, "MetaClaw did not recognise this project.")
    membership = (
        Membership.objects.filter(project=project, slack_user_id=interaction.slack_user_id)
        .exclude(slack_user_id="")
        .select_related("user")
        .first()
    )
    if membership is None:
        url = slack_link_url(
            project=project,
            slack_user_id=interaction.slack_user_id,
            slack_team_id=interaction.slack_team_id,
        )
        return _slack_refuse(
            interaction,
            f"Your Slack account is not linked to a member of {project.name} yet. "
            f"Link it here, then click again: {url}",
        )
    obj: SkillRevision | PolicyVersion | None
    if kind == "revision":
        obj = (
            SkillRevision.objects.select_related("skill__project")
            .filter(pk=object_id, skill__project=project)
            .first()
        )
    else:
        obj = PolicyVersion.objects.filter(pk=object_id, project=project).first()
    if obj is None:
        return _slack_refuse(interaction, "This object no longer exists.")
    if object_state(obj)[:16] != state:
        decided = _decided_message(obj)
        return _slack_refuse(
            interaction, decided or f"{obj} changed since this message; open it in MetaClaw."
        )
    Notification.objects.filter(
        channel=NotificationChannel.SLACK,
        kind=NotificationKind.APPROVAL_REQUEST,
        **({"revision": obj} if kind == "revision" else {"version": obj}),
    ).update(slack_response_url=interaction.response_url, slack_response_url_at=timezone.now())
    user = membership.user
    action_id = interaction.action_id
    try:
        if action_id == notify.SLACK_APPROVE and kind == "revision":
            obj = skill_revision_approve(revision=obj, actor=user)
            outcome = "approved" if obj.status == RevisionStatus.APPROVED else "first approval"
        elif action_id == notify.SLACK_REJECT and kind == "revision":
            skill_revision_reject(
                revision=obj, actor=user, reason=f"Rejected in Slack by {user.get_username()}."
            )
            outcome = "rejected"
        elif action_id == notify.SLACK_PROMOTE and kind == "version":
            policy_version_promote(version=obj, actor=user, reason="Promoted in Slack.")
            outcome = "promoted"
        else:
            return _slack_refuse(interaction, "MetaClaw did not recognise this button.")
    except DomainError as exc:
        return _slack_refuse(interaction, str(exc))
    interaction.status = InteractionStatus.DONE
    interaction.result = outcome
    interaction.processed_at = timezone.now()
    interaction.save(update_fields=["status", "result", "processed_at"])
    if outcome == "first approval":
        return SlackReply(
            interaction.response_url,
            notify.slack_ephemeral(
                "Your approval is recorded. This project needs a second reviewer to approve."
            ),
        )
    return None


def slack_interactions_stuck(*, older_than_seconds: int) -> list[int]:
    """Interactions nobody finished. PROCESSING ones whose worker died and RECEIVED ones older
    than Slack's response window are marked FAILED (the clicker may click again; a decision
    that did happen changed the object's state, so a second click is refused as already
    decided). RECEIVED ones whose task message was lost (the broker was down at commit) are
    returned, for the sweep to enqueue again; the claim in ``slack_interaction_handle`` makes
    a duplicate message a no-op."""
    now = timezone.now()
    # Rows carry no claim time, but a click is claimed within SLACK_INTERACTION_MAX_AGE of its
    # arrival or never: so one created longer ago than that plus twice the task time limit
    # (a live attempt is killed by then) has no live worker.
    dead = (
        now
        - SLACK_INTERACTION_MAX_AGE
        - timedelta(seconds=max(older_than_seconds, 2 * settings.CELERY_TASK_TIME_LIMIT))
    )
    SlackInteraction.objects.filter(
        status=InteractionStatus.PROCESSING, created_at__lt=dead
    ).update(
        status=InteractionStatus.FAILED,
        result="The worker processing this click stopped; click again if nothing changed.",
        processed_at=now,
    )
    SlackInteraction.objects.filter(
        status=InteractionStatus.RECEIVED, created_at__lt=now - SLACK_INTERACTION_MAX_AGE
    ).update(
        status=InteractionStatus.FAILED,
        result="This click was not processed in time; click again.",
        processed_at=now,
    )
    return list(
        SlackInteraction.objects.filter(
            status=InteractionStatus.RECEIVED,
            created_at__lt=now - timedelta(seconds=older_than_seconds),
        )
        .order_by("created_at")
        .values_list("pk", flat=True)[:500]
    )


def slack_interaction_fail(*, interaction_id: int, error: str) -> None:
    SlackInteraction.objects.filter(pk=interaction_id).update(
        status=InteractionStatus.FAILED, result=error[:2000], processed_at=timezone.now()
    )


# --- Reads for pages ------------------------------------------------------------------------


def notifications_for_project(project: Project):
    return Notification.objects.filter(project=project).select_related("revision__skill", "version")


def notifications_for_object(*, revision: SkillRevision | None = None, version=None):
    """For the revision and version pages: how the approval requests were delivered."""
    if revision is not None:
        return Notification.objects.filter(revision=revision)
    return Notification.objects.filter(version=version)
