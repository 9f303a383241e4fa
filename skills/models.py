"""Skills, their immutable revisions, policy versions, releases and approval requests."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from base.models import Project
from incidents.models import Incident, IncidentGroup


class Category(models.TextChoices):
    """The categories of the published MetaClaw's SKILL.md files."""

    GENERAL = "general", "General"
    CODING = "coding", "Coding"
    RESEARCH = "research", "Research"
    DATA_ANALYSIS = "data_analysis", "Data analysis"
    SECURITY = "security", "Security"
    COMMUNICATION = "communication", "Communication"
    AUTOMATION = "automation", "Automation"
    AGENTIC = "agentic", "Agentic"
    PRODUCTIVITY = "productivity", "Productivity"
    COMMON_MISTAKES = "common_mistakes", "Common mistakes"


class Skill(models.Model):
    """The stable identity of a skill; its content lives in revisions."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="skills")
    slug = models.SlugField(max_length=64)
    category = models.CharField(max_length=32, choices=Category.choices, default=Category.GENERAL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "slug"], name="skill_unique_slug"),
        ]
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class RevisionStatus(models.TextChoices):
    PROPOSED = "proposed", "Proposed"
    APPROVED = "approved", "Approved"
    REJECTED = "rejected", "Rejected"
    SUPERSEDED = "superseded", "Superseded"


class Author(models.TextChoices):
    LLM = "llm", "LLM"
    HUMAN = "human", "Human"


class Origin(models.TextChoices):
    """Where the text truly came from (the demo labels fixtures as such)."""

    LIVE_LLM = "live_llm", "Written by the configured LLM"
    HUMAN = "human", "Written by a person"
    IMPORT = "import", "Imported from SKILL.md"
    DEMO_FIXTURE = "demo_fixture", "Demo fixture (not written by a live LLM)"
    EVIDENCE_DRAFT = "evidence_draft", "Draft built from evidence (no LLM configured)"


class SkillRevision(models.Model):
    """Immutable content of a skill. Editing makes a new revision; only the status fields
    (through services) ever change after creation."""

    skill = models.ForeignKey(Skill, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    name = models.CharField(max_length=120)
    description = models.CharField(max_length=500, help_text="When to use it, in one sentence.")
    instructions = models.TextField(help_text="Markdown.")
    examples = models.JSONField(default=list, blank=True)
    category = models.CharField(max_length=32, choices=Category.choices, default=Category.GENERAL)
    author = models.CharField(max_length=8, choices=Author.choices)
    origin = models.CharField(max_length=16, choices=Origin.choices)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    source_groups = models.ManyToManyField(
        IncidentGroup, blank=True, related_name="skill_revisions"
    )
    source_incidents = models.ManyToManyField(Incident, blank=True, related_name="skill_revisions")
    diagnosis = models.TextField(blank=True, default="")
    # Redactions applied to the evidence before it left the process: [{"kind": "email", "count": 2}]
    redactions = models.JSONField(default=list, blank=True)
    llm_model = models.CharField(max_length=200, blank=True, default="")
    prompt_version = models.CharField(max_length=32, blank=True, default="")
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    embedding = models.JSONField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=RevisionStatus.choices, default=RevisionStatus.PROPOSED
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    first_approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decision_reason = models.TextField(blank=True, default="")
    # Set when a policy version containing this revision was rolled back: the fast loop must not
    # propose the same text again unchanged.
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["skill", "number"], name="revision_unique_number"),
        ]
        indexes = [models.Index(fields=["status", "-created_at"], name="revision_status_recent")]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.skill.slug} r{self.number}"


class VersionStatus(models.TextChoices):
    CANDIDATE = "candidate", "Candidate"
    ACTIVE = "active", "Active"
    RETIRED = "retired", "Retired"
    REJECTED = "rejected", "Rejected"


class PolicyVersion(models.Model):
    """What an agent runs with: a set of skill revisions and optionally a LoRA adapter.

    Immutable once created, except ``status`` (through services). Exactly one active version per
    project (the partial unique constraint; project creation makes version 1)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="policy_versions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )
    revisions = models.ManyToManyField(SkillRevision, blank=True, related_name="policy_versions")
    adapter_ref = models.CharField(max_length=500, blank=True, default="")
    base_model = models.CharField(max_length=200, blank=True, default="")
    changelog = models.TextField(blank=True, default="")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    status = models.CharField(
        max_length=16, choices=VersionStatus.choices, default=VersionStatus.CANDIDATE
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    # Set when a rollback moved away from this version: its data is kept out of training.
    rolled_back_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "number"], name="version_unique_number"),
            models.UniqueConstraint(
                fields=["project"],
                condition=models.Q(status="active"),
                name="version_one_active",
            ),
        ]
        ordering = ["-number"]

    def __str__(self) -> str:
        return f"v{self.number}"


class ReleaseKind(models.TextChoices):
    INITIAL = "initial", "Initial"
    APPROVAL = "approval", "Skill approval"
    PROMOTION = "promotion", "Promotion"
    ROLLBACK = "rollback", "Rollback"


class Release(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="releases")
    kind = models.CharField(max_length=16, choices=ReleaseKind.choices)
    from_version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    to_version = models.ForeignKey(PolicyVersion, on_delete=models.PROTECT, related_name="releases")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=200, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.from_version} → {self.to_version}"


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
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    outcome = models.CharField(max_length=32, blank=True, default="")
    channel = models.CharField(max_length=16, blank=True, default="link")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} for {self.addressee}"


class LlmUsage(models.Model):
    """Tokens spent on synthesis per project per day (the daily budget reads this)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="llm_usage")
    day = models.DateField()
    calls = models.PositiveIntegerField(default=0)
    tokens_in = models.PositiveBigIntegerField(default=0)
    tokens_out = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "day"], name="llm_usage_unique_day"),
        ]

    def __str__(self) -> str:
        return f"{self.project} {self.day}: {self.tokens_in + self.tokens_out} tokens"


# --- Notifications (approval requests and decisions sent to Slack, webhooks and e-mail) -----


class NotificationChannel(models.TextChoices):
    SLACK = "slack", "Slack"
    WEBHOOK = "webhook", "Webhook"
    EMAIL = "email", "E-mail"


class NotificationKind(models.TextChoices):
    APPROVAL_REQUEST = "approval_request", "Approval request"
    DECISION = "decision", "Decision"
    TEST = "test", "Test message"


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
