"""The canary's periodic check (the beat, every minute)."""

from __future__ import annotations

from celery import shared_task

from skills.canary import services


@shared_task(name="skills.tasks.check_canaries", acks_late=True, ignore_result=True)
def check_canaries() -> int:
    """Idempotent: each running canary is checked under its project's lock."""
    return services.canaries_check()
