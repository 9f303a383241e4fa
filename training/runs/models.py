"""Training runs and their states."""

from __future__ import annotations

from django.db import models
from django.utils import timezone as dj_timezone

from base.model_fields import person_field
from base.models import Project
from skills.versions.models import PolicyVersion
from training.datasets.models import DatasetSnapshot
from training.policy.models import Backend


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    PREPARING = "preparing", "Preparing"
    TRAINING = "training", "Training"
    PAUSED = "paused", "Paused"
    EVALUATING = "evaluating", "Evaluating"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_RUN_STATUSES = (
    RunStatus.QUEUED,
    RunStatus.PREPARING,
    RunStatus.TRAINING,
    RunStatus.PAUSED,
    RunStatus.EVALUATING,
)
FINAL_RUN_STATUSES = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


class PauseReason(models.TextChoices):
    NONE = "", "—"
    REQUESTED = "requested", "Paused by a person"
    NOT_IDLE = "not_idle", "The idle window closed or traffic returned"
    TIME_SLICE = "time_slice", "The worker's time slice ran out"
    STALE = "stale", "The worker stopped reporting (stale)"


class Trigger(models.TextChoices):
    SCHEDULE = "schedule", "Idle window"
    MANUAL = "manual", "Train now"


class TrainingRun(models.Model):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="training_runs")
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.SCHEDULE)
    requested_by = person_field()
    actor_label = models.CharField(max_length=200, blank=True, default="")
    backend = models.CharField(max_length=16, choices=Backend.choices)
    backend_options = models.JSONField(default=dict, blank=True)
    base_model = models.CharField(max_length=300)
    hyperparameters = models.JSONField(default=dict)
    dataset = models.ForeignKey(
        DatasetSnapshot, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    status_changed_at = models.DateTimeField(null=True, blank=True)
    pause_requested = models.BooleanField(default=False)
    pause_reason = models.CharField(
        max_length=16, choices=PauseReason.choices, blank=True, default=""
    )
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    # [{"step": 1, "loss": 2.31, ...}, ...]
    metrics = models.JSONField(default=list, blank=True)
    # The last resumable checkpoint and the step it was saved after.
    state_ref = models.CharField(max_length=500, blank=True, default="")
    state_step = models.PositiveIntegerField(default=0)
    adapter_ref = models.CharField(max_length=500, blank=True, default="")
    summary = models.JSONField(default=dict, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    log = models.TextField(blank=True, default="")
    error = models.TextField(blank=True, default="")
    eval_before = models.JSONField(null=True, blank=True)
    eval_after = models.JSONField(null=True, blank=True)
    # [{"prompt": [...messages], "reference": "...", "before": "...", "after": "..."}]
    sample_answers = models.JSONField(default=list, blank=True)
    # Judged by what the answers do (``training.runs.outcomes``): {"before": {...}, "after":
    # {...}, "difference": [low, high], "verdict": "...", "judged_by": "outcomes" | "loss"}.
    outcomes = models.JSONField(default=dict, blank=True)
    # The learning rate and steps the run chose (``training.runs.search``); {} when pinned.
    search = models.JSONField(default=dict, blank=True)
    improved = models.BooleanField(null=True, blank=True)
    flagged_no_improvement = models.BooleanField(default=False)
    candidate_version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=dj_timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["project", "-created_at"], name="run_project_recent"),
            models.Index(fields=["status", "heartbeat_at"], name="run_status_heartbeat"),
        ]
        constraints = [
            # One run in flight per project: the idle check and "train now" may race.
            models.UniqueConstraint(
                fields=["project"],
                condition=models.Q(
                    status__in=["queued", "preparing", "training", "paused", "evaluating"]
                ),
                name="run_one_active_per_project",
            ),
        ]

    def __str__(self) -> str:
        return f"run #{self.pk}"

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE_RUN_STATUSES

    @property
    def progress_percent(self) -> int:
        if not self.total_steps:
            return 0
        return min(100, round(100 * self.step / self.total_steps))
