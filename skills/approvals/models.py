"""Approval requests behind one-click links, notifications to channels, and Slack clicks."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from base.model_fields import person_field
from base.models import Project
from skills.library.models import SkillRevision
from skills.versions.models import PolicyVersion


class ApprovalAction(models.TextChoices):
    APPROVE_REVISION = "approve_revision", "Approve skill revision"
    REJECT_REVISION = "reject_revision", "Reject skill revision"
    PROMOTE_VERSION = "promote_version", "Promote policy version"


class ApprovalRequest(models.Model):
    """One action on one object for one addressee, behind a single-use expiring link."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="approval_requests")
    action = models.CharField(max_length=32, choices=ApprovalAction.choices)
    revision = models.ForeignKey(
        SkillRevision, null=True, blank=True, on_delete=models.CASCADE, related_name="approvals"
    )
    version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.CASCADE, related_name="approvals"
    )
    # Empty for a channel link (Slack, webhook, team e-mail): whoever opens it must log in and
    # hold the role; a personal link may act without a login unless the project requires one.
    addressee = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="approval_requests",
    )
    token_hash = models.CharField(max_length=64, unique=True)
    # The object's state when the link was made; a different state later refuses the link.
    object_state = models.CharField(max_length=64, blank=True, default="")
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    decided_by = person_field()
    outcome = models.CharField(max_length=32, blank=True, default="")
    channel = models.CharField(max_length=16, blank=True, default="link")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} for {self.addressee}"


class NotificationChannel(models.TextChoices):
    SLACK = "slack", "Slack"
    WEBHOOK = "webhook", "Webhook"
    EMAIL = "email", "E-mail"


class NotificationKind(models.TextChoices):
    APPROVAL_REQUEST = "approval_request", "Approval request"
    DECISION = "decision", "Decision"
    TEST = "test", "Test message"
    EFFECTIVENESS_FLAG = "effectiveness_flag", "Effectiveness flag"


class NotificationStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENDING = "sending", "Sending"
    RETRYING = "retrying", "Retrying"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"


class Notification(models.Model):
    """One message to one channel. The row is written before the task is enqueued (an outbox),
    and the task records every attempt here, so a delivery that finally failed shows why."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="notifications")
    channel = models.CharField(max_length=16, choices=NotificationChannel.choices)
    kind = models.CharField(max_length=32, choices=NotificationKind.choices)
    revision = models.ForeignKey(
        SkillRevision, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications"
    )
    version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications"
    )
    # Where it goes, for people to read ("Slack webhook", an e-mail address, a webhook host).
    recipient = models.CharField(max_length=300, blank=True, default="")
    # What is sent. Holds one-time links until delivery; they are blanked out once it is sent.
    payload = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=16, choices=NotificationStatus.choices, default=NotificationStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")
    # When a worker last claimed it: a row left SENDING long after this lost its worker.
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # Slack: the message's response_url from the latest interaction with it (valid 30 min), so a
    # decision can update the message in place instead of posting a follow-up.
    slack_response_url = models.URLField(max_length=1000, blank=True, default="")
    slack_response_url_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["project", "-created_at"], name="notification_project_recent"),
            models.Index(fields=["status", "created_at"], name="notification_status_age"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.kind} ({self.status})"


class InteractionStatus(models.TextChoices):
    RECEIVED = "received", "Received"
    PROCESSING = "processing", "Processing"
    DONE = "done", "Done"
    REFUSED = "refused", "Refused"
    FAILED = "failed", "Failed"


class SlackInteraction(models.Model):
    """A verified Slack interactivity request. ``dedupe_key`` (a hash of the payload) makes
    Slack's retries and duplicate deliveries land on the same row, so nothing acts twice."""

    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.CASCADE, related_name="slack_interactions"
    )
    dedupe_key = models.CharField(max_length=64, unique=True)
    slack_user_id = models.CharField(max_length=64, blank=True, default="")
    slack_team_id = models.CharField(max_length=64, blank=True, default="")
    action_id = models.CharField(max_length=100, blank=True, default="")
    payload = models.JSONField(default=dict)
    response_url = models.URLField(max_length=1000, blank=True, default="")
    status = models.CharField(
        max_length=16, choices=InteractionStatus.choices, default=InteractionStatus.RECEIVED
    )
    deliveries = models.PositiveIntegerField(default=1)
    result = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action_id} by {self.slack_user_id} ({self.status})"
