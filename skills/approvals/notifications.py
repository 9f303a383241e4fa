"""Telling people: a proposal or a candidate announced to its reviewers (personal links by
e-mail, channel links to Slack, a webhook or a team mailbox), the decision announced where the
request went, a test message, the delivery of each notification (claimed, sent, failed with
retries), and the project's integration settings.

Past 500 lines on purpose: announcing, delivering and retrying share the notification row's
claim and the project's integration settings; the import digest (``digest``) and the canary's
notices (``skills.canary.notify``) already live apart.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator, validate_email
from django.db import connection, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone

from base import permissions
from base.errors import DomainError
from base.models import Membership, Project, Role
from base.queue import enqueue_on_commit
from base.services import audit_record
from base.sql import placeholders
from skills.approvals import delivery
from skills.approvals.links import (
    CHANNEL_LINK,
    REQUIRED_ROLE,
    ROLES_AT_LEAST,
    SLACK_RESPONSE_URL_TTL,
    approval_link_url,
    approval_request_create,
    decided_message,
    eligible_members,
    object_state,
    project_of,
    provenance_note,
    revision_evidence,
    version_diff,
    when_text,
)
from skills.approvals.models import (
    ApprovalAction,
    Notification,
    NotificationChannel,
    NotificationKind,
    NotificationStatus,
)
from skills.library.models import SkillRevision
from skills.library.risk import is_flagged
from skills.versions.models import PolicyVersion, Release, VersionStatus
from skills.versions.services import (
    _revision_decided_message,
    _version_decided_message,
)

logger = logging.getLogger(__name__)


# --- Notifications -----------------------------------------------------------------------


def _enqueue(notification_ids: list[int]) -> None:
    enqueue_on_commit("skills.tasks.send_notification", *[(nid,) for nid in notification_ids])


def notifications_create(
    *, project: Project, kind: str, rows: list[tuple[str, str, dict]], **target: Any
) -> list[Notification]:
    """One notification of ``kind`` per (channel, recipient, payload) row, about ``target``
    (``revision=`` or ``version=``, or nothing), sent by ``skills.tasks.send_notification``
    after commit. The announcements of this module, the import digest and the canary's notices
    all write their rows here."""
    created = [
        Notification.objects.create(
            project=project,
            channel=channel,
            kind=kind,
            recipient=recipient[:300],
            payload=payload,
            **target,
        )
        for channel, recipient, payload in rows
    ]
    _enqueue([n.pk for n in created])
    return created


SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"


def mail_configured() -> bool:
    """Whether e-mail can go anywhere: a backend other than SMTP (console, file, in-memory:
    chosen on purpose), or SMTP with ``EMAIL_HOST`` set. Without one no e-mail notification is
    written, so no worker tries, and retries, a mail server that is not there."""
    return settings.EMAIL_BACKEND != SMTP_BACKEND or bool(settings.EMAIL_HOST)


def _team_emails(project: Project) -> list[str]:
    if not mail_configured():
        return []
    return [line.strip() for line in project.notify_emails.splitlines() if line.strip()]


def _actions_for(obj: SkillRevision | PolicyVersion) -> list[str]:
    if isinstance(obj, SkillRevision):
        # A flagged revision is approved only in the dashboard, with a typed reason.
        if is_flagged(obj.risk_findings):
            return [ApprovalAction.REJECT_REVISION]
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


def _summary(obj: SkillRevision | PolicyVersion) -> delivery.Summary:
    project = project_of(obj)
    about = {
        "project_name": project.name,
        "object_id": obj.pk,
        "project_id": project.pk,
        "state": object_state(obj)[:16],
    }
    if isinstance(obj, SkillRevision):
        evidence = revision_evidence(obj)
        title = f"Skill proposal: {obj.name}{provenance_note(evidence['provenance'])}"
        return delivery.Summary(
            kind="revision",
            title=f"{title}{_risk_title(obj)}",
            revision=obj,
            evidence=evidence,
            **about,
        )
    return delivery.Summary(
        kind="version",
        title=f"Candidate policy v{obj.number}",
        version=obj,
        diff=version_diff(obj),
        **about,
    )


def _risk_title(revision: SkillRevision) -> str:
    """What the risk check found, in the message's title (every channel shows it)."""
    flagged = [f for f in revision.risk_findings or [] if f.get("severity") == "flag"]
    # The LLM judge's answer was unusable: said, since it is not a pass (skills.library.judge).
    judge = " [LLM judge unavailable]" if revision.judge_status == "unavailable" else ""
    if not flagged:
        return judge
    kinds = ", ".join(sorted({f["kind"] for f in flagged}))
    return (
        f" [FLAGGED by the risk check: {len(flagged)} finding(s): {kinds}; approve it in "
        f"MetaClaw with a reason]{judge}"
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
    if decided_message(obj):
        return []
    project = project_of(obj)
    role = REQUIRED_ROLE[_actions_for(obj)[0]]
    target = {"revision": obj} if isinstance(obj, SkillRevision) else {"version": obj}
    slack_url, team = _slack_webhook(project), _team_emails(project)
    members = (
        [m for m in eligible_members(project, role) if m.user.email and m.user.email not in team]
        if mail_configured()
        else []
    )
    if not (slack_url or project.webhook_url or team or members):
        return []  # nobody to tell: no summary to build (it costs queries on the fast loop)
    with transaction.atomic():
        return _approval_notify_rows(obj, project, target, slack_url, team, members)


def _anyone_to_notify(obj: SkillRevision | PolicyVersion) -> bool:
    """Whether the project has a channel, or a member who may decide ``obj`` and has an
    address, as stored now. One written-out query: the fast loop asks this for every proposal,
    and the ORM's two queries cost it more CPU than the rest of the notifying
    (``benchmarks/synthesis_cost.py`` compares them)."""
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
    mail = mail_configured() and (team.strip() or member)
    return bool(slack_url.strip() or webhook_url.strip() or mail)


def _approval_notify_rows(
    obj: SkillRevision | PolicyVersion,
    project: Project,
    target: dict[str, Any],
    slack_url: str,
    team: list[str],
    members: list[Membership],
) -> list[Notification]:
    summary = _summary(obj)
    rows: list[tuple[str, str, dict]] = []

    def add(channel: str, recipient: str, payload: dict) -> None:
        rows.append((channel, recipient, payload))

    channel_links = (
        _links_for(obj, addressee=None, channel=CHANNEL_LINK)
        if slack_url or project.webhook_url or team
        else {}
    )
    if slack_url:
        message = delivery.slack_approval_message(
            summary, channel_links, interactive=_slack_interactive(project)
        )
        add(NotificationChannel.SLACK, "Slack webhook", {"mode": "webhook", "body": message})
    if project.webhook_url:
        body = delivery.webhook_event("approval.requested", summary, channel_links)
        add(NotificationChannel.WEBHOOK, delivery.host_of(project.webhook_url), {"body": body})
    for address in team:
        mail = delivery.approval_email(summary, channel_links, personal=False)
        add(NotificationChannel.EMAIL, address, {**mail, "to": [address]})
    for membership in members:
        address = membership.user.email
        links = _links_for(obj, addressee=membership.user, channel="email")
        mail = delivery.approval_email(summary, links, personal=True)
        add(NotificationChannel.EMAIL, address, {**mail, "to": [address]})
    return notifications_create(
        project=project, kind=NotificationKind.APPROVAL_REQUEST, rows=rows, **target
    )


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
    project = project_of(obj)
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
        message = delivery.slack_decided_message(summary, decided)
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
        body = delivery.webhook_event("approval.decided", summary, {}, decision=decided)
        rows.append(
            Notification.objects.create(
                project=project,
                channel=NotificationChannel.WEBHOOK,
                kind=NotificationKind.DECISION,
                recipient=delivery.host_of(project.webhook_url),
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
            f"{when_text(release.created_at)}."
        )
    return _version_decided_message(obj)


@transaction.atomic
def integrations_send_test(*, project: Project, actor: Any) -> list[Notification]:
    """A test message to every configured channel; the settings page shows how each went."""
    permissions.require_role(actor, project, Role.ADMIN)
    rows = []
    text = f"MetaClaw test message for {project.name}, sent by {actor.get_username()}."
    if _slack_webhook(project):
        rows.append((NotificationChannel.SLACK, "Slack webhook", delivery.slack_text_message(text)))
    if project.webhook_url:
        body = {"event": "test", "project": project.slug, "text": text}
        rows.append((NotificationChannel.WEBHOOK, delivery.host_of(project.webhook_url), body))
    for address in _team_emails(project):
        rows.append((NotificationChannel.EMAIL, address, {"to": [address]}))
    if not rows:
        raise DomainError(
            "Configure a Slack webhook, a webhook or an e-mail address first"
            + ("." if mail_configured() else " (and a mail server: EMAIL_HOST).")
        )
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


def effectiveness_flag_notify(*, revision: SkillRevision) -> list[Notification]:
    """Tell the channels that a live revision went back to the review queue because it did not
    work (``skills.effectiveness``), with the figures. Rows now, sending after commit."""
    project = revision.skill.project
    url = settings.METACLAW_PUBLIC_URL + reverse(
        "skills:revision_detail", kwargs={"project_slug": project.slug, "revision_id": revision.pk}
    )
    text = (
        f"The skill '{revision.skill.slug}' r{revision.number} is back in the review queue: "
        f"{revision.effectiveness_flag_reason} {url}"
    )
    rows = []
    if _slack_webhook(project):
        body = delivery.slack_text_message(text)
        rows.append((NotificationChannel.SLACK, "Slack webhook", {"mode": "webhook", "body": body}))
    if project.webhook_url:
        body = {"event": "skill.effectiveness_flagged", "project": project.slug, "text": text,
                "revision": revision.pk, "effectiveness": revision.effectiveness}  # fmt: skip
        rows.append(
            (NotificationChannel.WEBHOOK, delivery.host_of(project.webhook_url), {"body": body})
        )
    subject = f"Skill back in review: {revision.skill.slug} r{revision.number}"
    for address in _team_emails(project):
        mail = {"subject": subject, "text": text, "to": [address]}
        rows.append((NotificationChannel.EMAIL, address, mail))
    return notifications_create(
        project=project, kind=NotificationKind.EFFECTIVENESS_FLAG, rows=rows, revision=revision
    )


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
    notification.payload = delivery.strip_tokens(notification.payload)
    notification.save(update_fields=["status", "sent_at", "last_error", "payload"])


def notification_fail(*, notification_id: int, error: str, final: bool) -> None:
    """Record a failed attempt; ``final`` marks it FAILED for good (shown on the settings
    page and the object), otherwise RETRYING until the task's next attempt."""
    notification = Notification.objects.select_related("project").get(pk=notification_id)
    notification.status = NotificationStatus.FAILED if final else NotificationStatus.RETRYING
    notification.last_error = error[:2000]
    fields = ["status", "last_error"]
    if final:
        notification.payload = delivery.strip_tokens(notification.payload)
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
    refusal = delivery.url_refusal(value)
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
    permissions.require_role(actor, project, Role.ADMIN)
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
