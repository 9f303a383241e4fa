"""Traffic an agent counted itself: the turns of agents that neither go through the proxy nor
report each turn (``POST /api/v1/traffic``). Registered by ``incidents/models.py``."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from base.models import Project
from incidents.model_fields import (
    optional_client_id_field,
    reporting_api_key_field,
    unique_client_id,
)


class TrafficReport(models.Model):
    """``turns`` turns that ``agent_name`` served between ``window_start`` and ``window_end``
    (at most a day). Effectiveness counts them with the recorded turns, spread evenly over the
    window. ``client_id`` makes a retried report count once."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="traffic_reports")
    client_id = optional_client_id_field()
    agent_name = models.CharField(max_length=200)
    policy_version = models.PositiveIntegerField(null=True, blank=True)
    turns = models.PositiveIntegerField()
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    api_key = reporting_api_key_field()
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            unique_client_id(name="traffic_unique_client"),
            models.CheckConstraint(
                condition=models.Q(window_end__gt=models.F("window_start")),
                name="traffic_window_ends_after_start",
            ),
        ]
        indexes = [
            models.Index(fields=["project", "window_start"], name="traffic_window"),
        ]

    def __str__(self) -> str:
        return f"{self.turns} turns of {self.agent_name} from {self.window_start:%Y-%m-%d %H:%M}"
