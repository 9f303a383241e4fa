"""Read-mostly admin views of the slow loop. Run states change only through services (the
training pages and API), so the admin shows runs and snapshots read-only."""

from django.contrib import admin

from training.datasets.models import DatasetSnapshot
from training.policy.models import IdleWindowPolicy
from training.runs.models import TrainingRun


@admin.register(IdleWindowPolicy)
class IdleWindowPolicyAdmin(admin.ModelAdmin):
    list_display = ("project", "auto_train", "mode", "timezone", "backend", "base_model")
    list_filter = ("mode", "backend", "auto_train")


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "project",
        "status",
        "trigger",
        "backend",
        "step",
        "total_steps",
        "created_at",
    )
    list_filter = ("status", "backend", "trigger")
    raw_id_fields = ("dataset", "candidate_version", "requested_by")

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(DatasetSnapshot)
class DatasetSnapshotAdmin(admin.ModelAdmin):
    list_display = ("id", "project", "content_hash", "train_count", "eval_count", "created_at")
    exclude = ("samples", "trajectory_ids", "incident_ids")

    def has_change_permission(self, request, obj=None) -> bool:
        return False
