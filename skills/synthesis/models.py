"""What a project's LLM calls spent, per day (the daily budget reads it)."""

from __future__ import annotations

from django.db import models

from base.models import Project


class LlmUsage(models.Model):
    """Tokens spent per project per day by syntheses and the judge (the daily budget reads this)."""

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
