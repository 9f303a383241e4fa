"""The slow loop: when a project may train (idle windows), what it trains on (dataset snapshots)
and the training runs themselves."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone as dj_timezone

from base.models import Project
from skills.versions.models import PolicyVersion


class IdleMode(models.TextChoices):
    EITHER = "either", "A calendar window or quiet traffic"
    BOTH = "both", "A calendar window and quiet traffic"
    CALENDAR = "calendar", "Calendar windows only"
    TRAFFIC = "traffic", "Quiet traffic only"


class Backend(models.TextChoices):
    LOCAL = "local", "Local (PyTorch + PEFT)"
    TINKER = "tinker", "Tinker"


class Objective(models.TextChoices):
    SFT = "sft", "Supervised fine-tuning"
    RL = "rl", "Reinforcement learning (importance sampling)"


class IdleWindowPolicy(models.Model):
    """When a project may train, whether it trains on its own, and how.

    ``weekly_windows`` holds ``[{"days": [0, 1, 2, 3, 4], "start": "01:00", "end": "05:00"}]``
    (Monday = 0, times in ``timezone``; an end before the start runs past midnight)."""

    project = models.OneToOneField(Project, on_delete=models.CASCADE, related_name="idle_policy")
    auto_train = models.BooleanField(
        default=True, help_text="Start runs on its own when the project is idle and ready."
    )
    mode = models.CharField(max_length=16, choices=IdleMode.choices, default=IdleMode.EITHER)
    timezone = models.CharField(max_length=64, default="UTC")
    weekly_windows = models.JSONField(default=list, blank=True)
    ical_url = models.URLField(blank=True, default="", help_text="Events mark quiet windows.")
    ical_text = models.TextField(blank=True, default="", help_text="iCalendar (.ics) content.")
    ical_fetched_at = models.DateTimeField(null=True, blank=True)
    ical_error = models.CharField(max_length=300, blank=True, default="")
    traffic_threshold_rpm = models.PositiveIntegerField(
        default=5, help_text="Requests per minute below which traffic counts as quiet."
    )
    traffic_idle_minutes = models.PositiveIntegerField(
        default=30, help_text="Minutes traffic must stay below the threshold."
    )
    # Readiness and budgets
    min_new_samples = models.PositiveIntegerField(default=50)
    max_runs_per_day = models.PositiveIntegerField(default=1)
    max_tokens_per_run = models.PositiveIntegerField(default=500_000)
    max_sample_tokens = models.PositiveIntegerField(
        default=1024, help_text="Longer samples are cut to fit, or dropped when they cannot be."
    )
    eval_fraction = models.FloatField(default=0.2)
    stale_after_minutes = models.PositiveIntegerField(
        default=10, help_text="A training run without a heartbeat this long is marked stale."
    )
    # Backend and hyperparameters
    backend = models.CharField(max_length=16, choices=Backend.choices, default=Backend.LOCAL)
    backend_options = models.JSONField(default=dict, blank=True)
    base_model = models.CharField(max_length=300, default="smollm2-135m")
    objective = models.CharField(max_length=8, choices=Objective.choices, default=Objective.SFT)
    lora_rank = models.PositiveIntegerField(default=8)
    learning_rate = models.FloatField(default=1e-4)
    batch_size = models.PositiveIntegerField(default=4)
    total_steps = models.PositiveIntegerField(default=20)
    updated_at = models.DateTimeField(default=dj_timezone.now)

    def __str__(self) -> str:
        return f"idle policy of {self.project}"

    def hyperparameters(self) -> dict:
        return {
            "objective": self.objective,
            "lora_rank": self.lora_rank,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "total_steps": self.total_steps,
            "max_tokens": self.max_sample_tokens,
            "seed": 0,
        }


class DatasetSnapshot(models.Model):
    """The cleaned samples one run trains and evaluates on, frozen when the run starts.

    ``samples`` rows: ``{"trajectory_id", "incident_id", "session", "split": "train"|"eval",
    "kind": "sft"|"corrected"|"rl"|"incident", "messages", "reward", "group", "tokens"}`` (one
    of the two ids is set, the other is None)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="datasets")
    objective = models.CharField(max_length=8, choices=Objective.choices, default=Objective.SFT)
    trajectory_ids = models.JSONField(default=list)
    # Incidents (failures) the samples came from: negative RL samples or corrected answers.
    incident_ids = models.JSONField(default=list, blank=True)
    samples = models.JSONField(default=list)
    content_hash = models.CharField(max_length=64, db_index=True)
    report = models.JSONField(default=dict)
    # The policy version that introduced the skill set this data was gathered under.
    generation_version = models.PositiveIntegerField(null=True, blank=True)
    # Trajectories received up to this moment were considered.
    cutoff_at = models.DateTimeField()
    train_count = models.PositiveIntegerField(default=0)
    eval_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=dj_timezone.now)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"dataset {self.content_hash[:10]}"


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
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
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
