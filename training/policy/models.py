"""A project's training policy: when it may train (idle windows), whether it starts runs on its
own, and with what backend, objective and budgets."""

from __future__ import annotations

from django.db import models
from django.utils import timezone as dj_timezone

from base.models import Project


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
    # Minutes a run may spend choosing its learning rate and steps (``training.runs.search``);
    # 0 trains once with the learning rate and steps above (setting either one pins them).
    search_budget_minutes = models.PositiveIntegerField(default=30)
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
