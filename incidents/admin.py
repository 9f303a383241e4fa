from django.contrib import admin

from incidents.models import Incident, IncidentGroup, Trajectory


@admin.register(IncidentGroup)
class IncidentGroupAdmin(admin.ModelAdmin):
    list_display = (
        "title",
        "project",
        "agent_name",
        "kind",
        "event_count",
        "status",
        "synthesis_status",
        "last_seen",
    )
    list_filter = ("status", "synthesis_status", "kind", "project")
    search_fields = ("title", "fingerprint")
    readonly_fields = (
        "fingerprint",
        "fingerprint_version",
        "event_count",
        "first_seen",
        "last_seen",
    )


@admin.register(Incident)
class IncidentAdmin(admin.ModelAdmin):
    list_display = (
        "client_id",
        "project",
        "agent_name",
        "kind",
        "severity",
        "status",
        "occurred_at",
    )
    list_filter = ("kind", "severity", "status", "project")
    search_fields = ("client_id", "error_message")
    raw_id_fields = ("group",)


@admin.register(Trajectory)
class TrajectoryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "project",
        "session_id",
        "source",
        "policy_version",
        "outcome",
        "reward",
        "occurred_at",
    )
    list_filter = ("source", "outcome", "project")
    search_fields = ("session_id", "client_id")
