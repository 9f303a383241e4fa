"""The periodic effectiveness check (beat): a thin wrapper around ``services``."""

from __future__ import annotations

from celery import shared_task

from skills.effectiveness import services


@shared_task(name="skills.tasks.check_effectiveness", acks_late=True, ignore_result=True)
def check_effectiveness() -> int:
    """Measure recently live revisions; flag the ineffective and the harmful ones. Idempotent
    (a flagged revision is flagged once, under its row lock)."""
    return services.effectiveness_check_all()
