"""Incidents (agent failures), their Sentry-style groups, and ordinary trajectories."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone

from base.model_fields import person_field
from base.models import Project
from incidents.model_fields import (
    optional_client_id_field,
    reporting_api_key_field,
    unique_client_id,
)
from incidents.traffic_models import TrafficReport  # noqa: F401 - registered with the app


class IncidentKind(models.TextChoices):
    TOOL_ERROR = "tool_error", "Tool error"
    WRONG_ANSWER = "wrong_answer", "Wrong answer"
    USER_COMPLAINT = "user_complaint", "User complaint"
    TIMEOUT = "timeout", "Timeout"
    GUARDRAIL = "guardrail", "Guardrail"
    # Outcome-judged failures (benchmarks, evaluators, reviewers): the run ended in the wrong
    # state, broke a rule of its policy, or stopped without finishing.
    WRONG_STATE = "wrong_state", "Wrong final state"
    POLICY_VIOLATION = "policy_violation", "Policy violation"
    GAVE_UP = "gave_up", "Gave up"
    OTHER = "other", "Other"


class Severity(models.TextChoices):
    LOW = "low", "Low"
    MEDIUM = "medium", "Medium"
    HIGH = "high", "High"
    CRITICAL = "critical", "Critical"


SEVERITY_RANK = {"low": 1, "medium": 2, "high": 3, "critical": 4}


class GroupStatus(models.TextChoices):
    UNRESOLVED = "unresolved", "Unresolved"
    RESOLVED = "resolved", "Resolved"
    IGNORED = "ignored", "Ignored"
    REGRESSED = "regressed", "Regressed"


class SynthesisStatus(models.TextChoices):
    """Where the group stands in the fast loop. ``incidents`` only ever sets WAITING (the outbox
    signal); the skills app moves it on through ``incidents.services`` functions."""

    NONE = "none", "Not requested"
    WAITING = "waiting", "Waiting for a worker"
    RUNNING = "running", "Synthesis running"
    PROPOSED = "proposed", "Skill proposed"
    NO_SKILL = "no_skill", "No skill can help"
    NEEDS_SKILL = "needs_skill", "Needs a skill (no LLM)"
    FAILED = "failed", "Synthesis failed"
    BUDGET = "budget", "Waiting: daily LLM budget spent"
    # Fewer distinct sources than the project's ``min_sources_for_synthesis``: the next incident
    # asks again, as from NONE (``ingest_sql.upsert_groups``).
    SOURCES = "sources", "Waiting: too few distinct sources"


class IncidentGroup(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="incident_groups")
    fingerprint = models.CharField(max_length=64)
    fingerprint_version = models.PositiveSmallIntegerField(default=1)
    title = models.CharField(max_length=300)
    agent_name = models.CharField(max_length=200)
    kind = models.CharField(max_length=32, choices=IncidentKind.choices)
    error_type = models.CharField(max_length=200, blank=True, default="")
    tool_name = models.CharField(max_length=200, blank=True, default="")
    normalized_message = models.TextField(blank=True, default="")
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.MEDIUM)
    event_count = models.PositiveIntegerField(default=0)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    status = models.CharField(
        max_length=16, choices=GroupStatus.choices, default=GroupStatus.UNRESOLVED
    )
    status_changed_at = models.DateTimeField(null=True, blank=True)
    regressed_at = models.DateTimeField(null=True, blank=True)
    # Fast-loop outbox: the group awaits synthesis while status is WAITING. ``events_at_synthesis``
    # is the event count the last synthesis saw, so later incidents are shown as new evidence.
    synthesis_status = models.CharField(
        max_length=16, choices=SynthesisStatus.choices, default=SynthesisStatus.NONE
    )
    synthesis_requested_at = models.DateTimeField(null=True, blank=True)
    # When a worker claimed the group (WAITING → RUNNING): a RUNNING group is stale by this.
    synthesis_claimed_at = models.DateTimeField(null=True, blank=True)
    synthesis_error = models.TextField(blank=True, default="")
    synthesis_attempts = models.PositiveIntegerField(default=0)
    events_at_synthesis = models.PositiveIntegerField(default=0)
    # Groups whose failures are the same problem in other words (linked by similarity).
    related_groups = models.ManyToManyField("self", blank=True, symmetrical=True)
    # Merged, as in Sentry: this group's incidents moved to ``merged_into`` and the incidents
    # that still arrive with its fingerprint go there too. The row stays as the alias.
    merged_into = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="merged_groups"
    )
    merged_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "fingerprint"], name="group_unique_fp"),
        ]
        indexes = [
            models.Index(fields=["project", "-last_seen", "-id"], name="group_recent"),
            models.Index(fields=["project", "status", "-last_seen"], name="group_status_recent"),
            models.Index(
                fields=["synthesis_status", "synthesis_requested_at"], name="group_outbox"
            ),
        ]

    def __str__(self) -> str:
        return self.title


class IncidentStatus(models.TextChoices):
    NEW = "new", "New"
    ANALYZING = "analyzing", "Analyzing"
    PROPOSED = "proposed", "Proposed"
    NO_SKILL = "no_skill", "No skill"
    FAILED = "failed", "Failed"
    RESOLVED = "resolved", "Resolved"
    IGNORED = "ignored", "Ignored"


class Incident(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="incidents")
    client_id = models.CharField(max_length=200)
    group = models.ForeignKey(IncidentGroup, on_delete=models.CASCADE, related_name="incidents")
    agent_name = models.CharField(max_length=200)
    agent_version = models.CharField(max_length=100, blank=True, default="")
    # The policy version number the agent ran with (a number, not a key: incidents outlive
    # nothing and know nothing of the skills app).
    policy_version = models.PositiveIntegerField(null=True, blank=True)
    kind = models.CharField(max_length=32, choices=IncidentKind.choices)
    severity = models.CharField(max_length=16, choices=Severity.choices, default=Severity.MEDIUM)
    error_type = models.CharField(max_length=200, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    tool_name = models.CharField(max_length=200, blank=True, default="")
    messages = models.JSONField(default=list, blank=True)
    tools = models.JSONField(default=list, blank=True)
    feedback_text = models.TextField(blank=True, default="")
    feedback_score = models.FloatField(null=True, blank=True)
    reward = models.FloatField(null=True, blank=True)
    # What the agent was asked to do, how the run ended (a final state, an answer), and what
    # should have happened when the reporter knows it (an evaluator's expected state).
    task = models.TextField(blank=True, default="")
    outcome = models.TextField(blank=True, default="")
    expected_outcome = models.TextField(blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True)
    session_id = models.CharField(max_length=200, blank=True, default="")
    # Who the agent served, when it says (``end_user``, or ``user`` at the top or in metadata),
    # and the API key that reported it: the provenance a proposal's evidence is counted by.
    end_user = models.CharField(max_length=200, blank=True, default="")
    api_key = reporting_api_key_field()
    fingerprint = models.CharField(max_length=64)
    status = models.CharField(
        max_length=16, choices=IncidentStatus.choices, default=IncidentStatus.NEW
    )
    occurred_at = models.DateTimeField(default=timezone.now)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["project", "client_id"], name="incident_unique_client"),
        ]
        indexes = [
            models.Index(
                fields=["project", "-occurred_at", "-received_at"], name="incident_recent"
            ),
            models.Index(fields=["group", "-occurred_at"], name="incident_group_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.kind}: {self.error_message[:80] or self.client_id}"


class TurnType(models.TextChoices):
    MAIN = "main", "Main"
    SIDE = "side", "Side"


class TrajectorySource(models.TextChoices):
    API = "api", "API"
    PROXY = "proxy", "Proxy"


class Outcome(models.TextChoices):
    SUCCESS = "success", "Success"
    FAILURE = "failure", "Failure"
    UNKNOWN = "unknown", "Unknown"


class Trajectory(models.Model):
    """An ordinary turn (or a whole short session) with its outcome: the slow loop's data."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="trajectories")
    client_id = optional_client_id_field()
    session_id = models.CharField(max_length=200, blank=True, default="", db_index=True)
    end_user = models.CharField(max_length=200, blank=True, default="")
    api_key = reporting_api_key_field()
    turn_type = models.CharField(max_length=8, choices=TurnType.choices, default=TurnType.MAIN)
    source = models.CharField(
        max_length=8, choices=TrajectorySource.choices, default=TrajectorySource.API
    )
    agent_name = models.CharField(max_length=200, blank=True, default="")
    policy_version = models.PositiveIntegerField(null=True, blank=True)
    model = models.CharField(max_length=200, blank=True, default="")
    messages = models.JSONField(default=list, blank=True)
    response = models.JSONField(null=True, blank=True)
    tools = models.JSONField(default=list, blank=True)
    skills_injected = models.JSONField(default=list, blank=True)
    reward = models.FloatField(null=True, blank=True)
    outcome = models.CharField(max_length=8, choices=Outcome.choices, default=Outcome.UNKNOWN)
    # A person's corrected answer: SFT data even when the original answer was bad.
    corrected_answer = models.TextField(blank=True, default="")
    latency_ms = models.FloatField(null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    occurred_at = models.DateTimeField(default=timezone.now)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            unique_client_id(name="trajectory_unique_client"),
        ]
        indexes = [
            models.Index(fields=["project", "-occurred_at"], name="trajectory_recent"),
            models.Index(fields=["project", "policy_version"], name="trajectory_version"),
        ]

    def __str__(self) -> str:
        return f"trajectory {self.id} ({self.session_id or 'no session'})"


class AbusiveSourceKind(models.TextChoices):
    SESSION = "session", "Session"
    END_USER = "end_user", "End user"


class AbusiveSource(models.Model):
    """A session or end user a person marked as abusive: their samples leave later datasets,
    and the proposals whose evidence came from them are flagged on the review page."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="abusive_sources")
    kind = models.CharField(max_length=16, choices=AbusiveSourceKind.choices)
    value = models.CharField(max_length=200)
    reason = models.TextField(blank=True, default="")
    marked_by = person_field()
    marked_by_label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["project", "kind", "value"], name="abusive_source_unique"
            ),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} {self.value}"
