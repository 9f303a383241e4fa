"""The incidents app's Celery tasks: thin, they call its services."""

from __future__ import annotations

from celery import shared_task

from incidents.partitions import incident_partitions_ensure


@shared_task(name="incidents.tasks.ensure_incident_partitions", acks_late=True, ignore_result=True)
def ensure_incident_partitions() -> None:
    """Daily: next months' partitions of a partitioned incidents table (nothing otherwise)."""
    incident_partitions_ensure()
