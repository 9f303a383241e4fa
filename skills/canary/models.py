"""A canary release: a candidate version served to a share of the sessions."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from base.models import Project
from skills.versions.models import PolicyVersion


class CanaryOutcome(models.TextChoices):
    RUNNING = "running", "Running"
    PROMOTED = "promoted", "Promoted"
    STOPPED = "stopped", "Stopped"
    ROLLED_BACK = "rolled_back", "Rolled back automatically"


class CanaryRelease(models.Model):
    """``version`` (a candidate) serves ``share_percent`` % of the sessions from ``started_at``
    until ``ended_at``; the others (control) get the active version. Rolled back automatically
    when the canary's incidents per 1,000 turns exceed control's by more than
    ``margin_per_1000`` once each arm has ``min_turns`` turns (and the difference is
    significant). At most one runs per project."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="canaries")
    version = models.ForeignKey(
        PolicyVersion, on_delete=models.CASCADE, related_name="canary_releases"
    )
    control_number = models.PositiveIntegerField()
    share_percent = models.PositiveSmallIntegerField()
    margin_per_1000 = models.FloatField()
    min_turns = models.PositiveIntegerField()
    outcome = models.CharField(
        max_length=16, choices=CanaryOutcome.choices, default=CanaryOutcome.RUNNING
    )
    # The figures of the last check (and of the decision that ended it, when it ended so).
    figures = models.JSONField(default=dict, blank=True)
    started_by_label = models.CharField(max_length=200, blank=True, default="")
    ended_by_label = models.CharField(max_length=200, blank=True, default="")
    end_reason = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(default=timezone.now)
    ended_at = models.DateTimeField(null=True, blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["project"],
                condition=models.Q(outcome="running"),
                name="canary_one_running",
            ),
        ]

    def __str__(self) -> str:
        return f"canary v{self.version.number} at {self.share_percent}% ({self.outcome})"
