"""The replay gate on the slow queue (``CELERY_TASK_ROUTES``): never in front of ingestion or
the fast loop."""

from __future__ import annotations

from celery import shared_task

from skills.gate import services


@shared_task(name="skills.tasks.replay_gate_run", acks_late=True, ignore_result=True)
def replay_gate_run(gate_id: int) -> None:
    """Idempotent: only the worker that claims the PENDING gate runs it."""
    services.replay_gate_run(gate_id=gate_id)
