from django.contrib import admin

from skills.approvals.models import ApprovalRequest, Notification, SlackInteraction
from skills.library.models import Skill, SkillRevision
from skills.synthesis.models import LlmUsage
from skills.versions.models import PolicyVersion, Release


@admin.register(Skill)
class SkillAdmin(admin.ModelAdmin):
    list_display = ("slug", "project", "category", "created_at")
    list_filter = ("category", "project")


@admin.register(SkillRevision)
class SkillRevisionAdmin(admin.ModelAdmin):
    list_display = ("skill", "number", "name", "status", "author", "origin", "created_at")
    list_filter = ("status", "author", "origin")
    raw_id_fields = ("skill", "parent", "source_groups", "source_incidents")


@admin.register(PolicyVersion)
class PolicyVersionAdmin(admin.ModelAdmin):
    list_display = ("number", "project", "status", "base_model", "adapter_ref", "created_at")
    list_filter = ("status", "project")
    raw_id_fields = ("parent", "revisions")


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    list_display = ("created_at", "project", "kind", "from_version", "to_version", "actor_label")
    list_filter = ("kind", "project")


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(admin.ModelAdmin):
    list_display = ("action", "project", "addressee", "expires_at", "used_at", "outcome")
    list_filter = ("action", "outcome")
    exclude = ("token_hash",)


@admin.register(LlmUsage)
class LlmUsageAdmin(admin.ModelAdmin):
    list_display = ("project", "day", "calls", "tokens_in", "tokens_out")


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ("created_at", "project", "channel", "kind", "status", "attempts", "sent_at")
    list_filter = ("channel", "kind", "status", "project")
    # The payload can hold single-use links until delivery: never show it.
    exclude = ("payload",)
    readonly_fields = ("last_error", "attempts", "sent_at")


@admin.register(SlackInteraction)
class SlackInteractionAdmin(admin.ModelAdmin):
    list_display = ("created_at", "project", "slack_user_id", "action_id", "status", "deliveries")
    list_filter = ("status", "project")
    exclude = ("payload",)
