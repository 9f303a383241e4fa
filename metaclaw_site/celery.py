"""The Celery app. Task modules of every app are discovered here (the composition root)."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")

app = Celery("metaclaw")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

app.conf.beat_schedule = {
    "sweep-waiting-groups": {"task": "skills.tasks.sweep_waiting_groups", "schedule": 15.0},
    "check-idle-windows": {"task": "training.tasks.check_idle_windows", "schedule": 60.0},
    "sweep-slack-interactions": {"task": "skills.tasks.sweep_slack_interactions", "schedule": 60.0},
    "sweep-pending-notifications": {
        "task": "skills.tasks.sweep_pending_notifications",
        "schedule": 60.0,
    },
}
