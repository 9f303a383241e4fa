"""Django's admin for projects. It lives in the project package because adding a project also
makes its first policy version (the skills app's)."""

from django.contrib import admin

from base.models import Membership, Project
from skills.versions.services import policy_version_create_initial


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "slug", "created_at", "require_second_approver")
    search_fields = ("name", "slug")
    inlines = [MembershipInline]
    exclude = ("slack_signing_secret", "webhook_secret", "upstream_api_key")

    def save_model(self, request, obj, form, change) -> None:
        super().save_model(request, obj, form, change)
        if not change:  # a project starts with its policy v1, as metaclaw_site.projects does
            policy_version_create_initial(project=obj)
