from django.contrib import admin

from .models import ApiKey, AuditEvent, Membership, Project


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "created_at", "require_second_approver")
    search_fields = ("name", "slug")
    inlines = [MembershipInline]
    exclude = ("slack_signing_secret", "webhook_secret", "upstream_api_key")


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
