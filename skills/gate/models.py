"""A replay gate of one candidate version, and the judged pairs of answers it replayed."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from base.models import Project, ReplayGateMode
from incidents.models import Incident
from skills.versions.models import PolicyVersion

# The modes are the project setting's (``Project.replay_gate_mode``): one list for both.
GateMode = ReplayGateMode


class GateStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    PASSED = "passed", "Passed"
    FAILED = "failed", "Failed"
    ERROR = "error", "Error"


class ReplayGate(models.Model):
    """One run of the gate for ``version`` against ``baseline_number`` (the active version when
    it was requested), with the caps it ran under and what it spent."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="replay_gates")
    version = models.ForeignKey(
        PolicyVersion, on_delete=models.CASCADE, related_name="replay_gates"
    )
    baseline_number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=GateStatus.choices, default=GateStatus.PENDING)
    wins = models.PositiveIntegerField(default=0)
    ties = models.PositiveIntegerField(default=0)
    losses = models.PositiveIntegerField(default=0)
    calls = models.PositiveIntegerField(default=0)
    tokens = models.PositiveIntegerField(default=0)
    max_calls = models.PositiveIntegerField()
    max_tokens = models.PositiveIntegerField()
    # The caps stopped it before every sampled conversation was replayed.
    capped = models.BooleanField(default=False)
    note = models.TextField(blank=True, default="")
    requested_by_label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"replay gate of v{self.version.number}: {self.status}"


class Verdict(models.TextChoices):
    WIN = "win", "Candidate better"
    TIE = "tie", "Tie"
    LOSS = "loss", "Active better"


class ReplayPair(models.Model):
    """One recorded failing conversation, replayed with both prompts, and how it was judged:
    ``check`` (the incident's expected outcome, found in one answer only) or ``judge``."""

    gate = models.ForeignKey(ReplayGate, on_delete=models.CASCADE, related_name="pairs")
    incident = models.ForeignKey(Incident, null=True, on_delete=models.SET_NULL, related_name="+")
    verdict = models.CharField(max_length=8, choices=Verdict.choices)
    method = models.CharField(max_length=8, default="judge")
    candidate_answer = models.TextField(blank=True, default="")
    active_answer = models.TextField(blank=True, default="")
    reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.verdict} ({self.method})"
