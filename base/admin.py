"""Django's admin for tenancy and audit. Projects are registered by the project package
(``metaclaw_site.admin``): a new project also gets its first policy version."""

from django.contrib import admin

from base.models import ApiKey, AuditEvent, Membership


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "project", "role", "slack_user_id")
    list_filter = ("role", "project")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "prefix",
        "project",
        "scopes",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    list_filter = ("project",)
    readonly_fields = ("prefix", "hashed_secret", "created_at", "last_used_at", "revoked_at")

    def has_add_permission(self, request):  # keys are issued through the dashboard or CLI
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "project", "actor_label", "action", "object_type", "object_repr")
    list_filter = ("action", "project")
    search_fields = ("object_repr", "actor_label", "message")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
