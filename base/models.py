"""Tenancy (projects, memberships, API keys) and the append-only audit log."""

from __future__ import annotations

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from base.model_fields import person_field


class ReplayGateMode(models.TextChoices):
    """``Project.replay_gate_mode``; the gate itself (``skills.gate``) reads it as ``GateMode``."""

    OFF = "off", "Off"
    ADVISORY = "advisory", "Advisory"
    REQUIRED = "required", "Required"


class Project(models.Model):
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    # Ingestion
    rate_limit_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests per minute per API key; empty = site default."
    )
    # Review and approval
    require_second_approver = models.BooleanField(
        default=False, help_text="A skill revision goes live only after two different reviewers."
    )
    approval_link_ttl_hours = models.PositiveIntegerField(default=72)
    approval_links_require_login = models.BooleanField(default=False)
    # Fast loop
    llm_daily_token_budget = models.PositiveIntegerField(
        default=0,
        help_text="Tokens in + out per day for skill synthesis and the LLM judge; 0 = unlimited.",
    )
    min_sources_for_synthesis = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text="Distinct sources (end users, else sessions, else API keys) a group's "
        "incidents must come from before a skill is synthesised for it; 1 = any incident.",
    )
    # Grouping
    group_merge_threshold = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Cosine similarity at which a new group joins an open group of the same "
        "failure mode; 0 = the site default.",
    )
    incidental_tools = models.TextField(
        blank=True,
        default="",
        help_text="Tool names (one a line, * as a wildcard) that never decide a failure's group, "
        "beside the built-in ones (hand-offs to a person, calculators, thinking).",
    )
    # Risk check (skills.library.risk): domains (one a line; subdomains included) that skill
    # texts may name in URLs and e-mail addresses without a finding.
    risk_allowed_domains = models.TextField(
        blank=True,
        default="",
        help_text="Domains skill texts may link to or name in e-mail addresses, one a line "
        "(subdomains included); any other is a risk finding.",
    )
    # Integrations (secrets are write-only in the UI)
    slack_webhook_url = models.URLField(blank=True, default="")
    slack_signing_secret = models.CharField(max_length=200, blank=True, default="")
    webhook_url = models.URLField(blank=True, default="")
    webhook_secret = models.CharField(max_length=200, blank=True, default="")
    notify_emails = models.TextField(blank=True, default="", help_text="One address a line.")
    # Runtime
    upstream_base_url = models.URLField(blank=True, default="")
    # Encrypted at rest (base.crypto); read it with base.selectors.project_upstream_api_key.
    upstream_api_key = models.CharField(max_length=1000, blank=True, default="")
    upstream_model_map = models.JSONField(default=dict, blank=True)
    # Replay gate (skills.gate): recorded failing conversations replayed with a candidate's and
    # the active version's system prompt, judged, before the candidate may be promoted.
    replay_gate_mode = models.CharField(
        max_length=16,
        choices=ReplayGateMode.choices,
        default=ReplayGateMode.OFF,
        help_text="Off: no replay. Advisory: replayed and shown. Required: promotion waits for "
        "a passed gate.",
    )
    replay_gate_max_calls = models.PositiveIntegerField(
        default=60, help_text="Model calls (replays and judgements) one gate may make."
    )
    replay_gate_max_tokens = models.PositiveIntegerField(
        default=200_000, help_text="Tokens in + out one gate may spend."
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    REVIEWER = "reviewer", "Reviewer"
    ADMIN = "admin", "Admin"


ROLE_RANK = {Role.VIEWER: 1, Role.REVIEWER: 2, Role.ADMIN: 3}


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    slack_user_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "project"], name="membership_unique_user"),
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.project} ({self.role})"

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[Role(self.role)] >= ROLE_RANK[Role(role)]


class ApiKeyScope(models.TextChoices):
    INGEST = "ingest", "Ingest"
    RUNTIME = "runtime", "Runtime"
    ADMIN = "admin", "Admin"


class ApiKey(models.Model):
    """A project's API key. Only a SHA-256 hash of the secret is stored; ``prefix`` is the
    visible part people use to tell keys apart (and the index we look keys up by)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200)
    prefix = models.CharField(max_length=16, unique=True)
    hashed_secret = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_by = person_field()
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def owner_id(self) -> int | None:
        """The person the key acts for: whoever made it in the dashboard (``created_by``), so a
        decision made with it counts as theirs (``base.permissions.person_id``). A key made by a
        command (``create_api_key``) has none and counts as no one. The owner is the creator on
        purpose: were it assignable, one admin could mint a key "owned" by a colleague and be
        two reviewers alone."""
        return self.created_by_id


class AuditEvent(models.Model):
    """Append-only: nothing updates or deletes these rows (the admin is read-only)."""

    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.CASCADE, related_name="audit_events"
    )
    actor = person_field()
    # Who acted when there is no user: "api-key:mc_ab12", "system", "slack:U123".
    actor_label = models.CharField(max_length=200, blank=True, default="")
    action = models.CharField(max_length=100, db_index=True)
    object_type = models.CharField(max_length=100, blank=True, default="")
    object_id = models.CharField(max_length=64, blank=True, default="")
    object_repr = models.CharField(max_length=300, blank=True, default="")
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    message = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["project", "-created_at", "-id"], name="audit_project_recent")
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.object_type}:{self.object_id}"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            raise RuntimeError("Audit events are append-only.")
        super().save(*args, **kwargs)
