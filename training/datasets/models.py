"""Dataset snapshots: the cleaned samples one run trains and evaluates on."""

from __future__ import annotations

from django.db import models
from django.utils import timezone as dj_timezone

from base.models import Project
from training.policy.models import Objective


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
