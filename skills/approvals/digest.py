"""One message per SKILL.md import: the reviewers hear that the imported skills await them, in
a list with a link to the review queue, instead of one message (and one e-mail each) per skill.
Same channels and people as a single proposal (``notifications.approval_notify``): Slack, the
project's webhook, the team mailboxes and each member who may decide, e-mail only with a mail
server configured."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.urls import reverse

from base.models import Project
from skills.approvals import delivery
from skills.approvals.links import REQUIRED_ROLE, eligible_members
from skills.approvals.models import (
    ApprovalAction,
    Notification,
    NotificationChannel,
    NotificationKind,
)
from skills.approvals.notifications import (
    _slack_webhook,
    _team_emails,
    mail_configured,
    notifications_create,
)
from skills.library.models import RevisionStatus, SkillRevision

LISTED = 40  # skills named in one message; the review queue has them all


def approval_import_notify(
    *, project_id: int, revision_ids: list[int], actor_label: str = ""
) -> list[Notification]:
    """One notification per channel and per reviewer for the revisions an import proposed
    (those still awaiting a decision). Rows first, sending after commit."""
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        return []
    revisions = list(
        SkillRevision.objects.filter(
            pk__in=revision_ids, skill__project=project, status=RevisionStatus.PROPOSED
        )
        .select_related("skill")
        .order_by("skill__slug")
    )
    if not revisions:
        return []
    slack_url, team = _slack_webhook(project), _team_emails(project)
    role = REQUIRED_ROLE[ApprovalAction.APPROVE_REVISION]
    members = (
        [m.user.email for m in eligible_members(project, role) if m.user.email not in ("", *team)]
        if mail_configured()
        else []
    )
    if not (slack_url or project.webhook_url or team or members):
        return []
    review_url = settings.METACLAW_PUBLIC_URL + reverse(
        "skills:review_queue", kwargs={"project_slug": project.slug}
    )
    title = f"{len(revisions)} imported skill(s) await review"
    by = f" (imported by {actor_label})" if actor_label else ""
    lines = [
        f"{r.skill.slug} r{r.number}: {r.name}. {_cut(r.description, 200)}"
        for r in revisions[:LISTED]
    ]
    if len(revisions) > LISTED:
        lines.append(f"…and {len(revisions) - LISTED} more.")
    payloads: list[tuple[str, str, dict]] = []
    if slack_url:
        message = _slack_digest(f"{title}{by}", project.name, lines, review_url)
        payloads.append(
            (NotificationChannel.SLACK, "Slack webhook", {"mode": "webhook", "body": message})
        )
    if project.webhook_url:
        body = _webhook_digest(project, revisions, review_url, actor_label)
        payloads.append(
            (NotificationChannel.WEBHOOK, delivery.host_of(project.webhook_url), {"body": body})
        )
    text = "\n".join(
        [
            f"{title}{by}",
            f"Project: {project.name}",
            "",
            *(f"- {line}" for line in lines),
            "",
            f"Decide on each in the review queue: {review_url}",
        ]
    )
    mail = {"subject": f"[MetaClaw] {title} in {project.name}", "text": text}
    for address in [*team, *members]:
        payloads.append((NotificationChannel.EMAIL, address, {**mail, "to": [address]}))
    with transaction.atomic():
        return notifications_create(
            project=project, kind=NotificationKind.APPROVAL_REQUEST, rows=payloads
        )


def _cut(text: str, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _esc(text: str) -> str:
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_digest(title: str, project_name: str, lines: list[str], review_url: str) -> dict:
    listing = _cut_block("\n".join(f"• {_esc(line)}" for line in lines), 2900)
    return {
        "text": f"{title} ({project_name})",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": _cut(title, 150)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": listing}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"{_esc(project_name)} · MetaClaw"}],
            },
            {
                "type": "actions",
                "block_id": "metaclaw_import",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open the review queue"},
                        "action_id": f"{delivery.SLACK_OPEN}_queue",
                        "url": review_url,
                    }
                ],
            },
        ],
    }


def _cut_block(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _webhook_digest(
    project: Project, revisions: list[SkillRevision], review_url: str, actor_label: str
) -> dict:
    return {
        "event": "approval.requested",
        "project": {"id": project.pk, "name": project.name},
        "object": {
            "type": "import",
            "title": f"{len(revisions)} imported skill(s) await review",
            "imported_by": actor_label,
            "revisions": [
                {
                    "id": r.pk,
                    "skill": r.skill.slug,
                    "number": r.number,
                    "name": r.name,
                    "description": r.description,
                    "status": r.status,
                }
                for r in revisions
            ],
        },
        "links": {"review": review_url},
    }
