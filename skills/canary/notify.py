"""Telling people about a decision MetaClaw took by itself (a canary rolled back), on the
project's channels, through the approvals' notifications (rows first, sent by
``skills.tasks.send_notification`` after commit). Kept here rather than in
``skills.approvals.notifications``, which is past its size budget."""

from __future__ import annotations

from typing import Any

from base.models import Project
from skills.approvals import delivery
from skills.approvals.models import Notification, NotificationChannel, NotificationKind
from skills.approvals.notifications import _slack_webhook, _team_emails, notifications_create


def automatic_decision_notify(
    *, project: Project, event: str, title: str, text: str, figures: dict[str, Any]
) -> list[Notification]:
    """Tell every configured channel (Slack, the webhook, the team mailboxes) about a decision
    MetaClaw took by itself (a canary rolled back), with its figures. Rows first, sending
    after commit. A DECISION with no version, so a later person's decision on that version is
    still announced (``approval_decision_notify`` announces each version once)."""
    rows: list[tuple[str, str, dict]] = []
    slack_url = _slack_webhook(project)
    if slack_url:
        message = delivery.slack_text_message(f"*{title}*\n{text}")
        rows.append(
            (NotificationChannel.SLACK, "Slack webhook", {"mode": "webhook", "body": message})
        )
    if project.webhook_url:
        body = {"event": event, "project": {"id": project.pk, "name": project.name},
                "title": title, "text": text, "figures": figures}  # fmt: skip
        rows.append((NotificationChannel.WEBHOOK, delivery.host_of(project.webhook_url),
                     {"body": body}))  # fmt: skip
    for address in _team_emails(project):
        rows.append((NotificationChannel.EMAIL, address,
                     {"to": [address], "subject": f"MetaClaw: {title}", "text": text}))  # fmt: skip
    return notifications_create(project=project, kind=NotificationKind.DECISION, rows=rows)
