"""Who decided on a revision, and who gave the first of two approvals, as fields of the revision.

Until now both were read back from the audit log. The backfill copies them from there, so the
messages ("already approved by ...") and the second-approver rule see exactly what they saw."""

from django.db import migrations, models

DECISIONS = [
    "skill_revision.approve",
    "skill_revision.reject",
    "skill_revision.edit",
    "skill_revision.supersede",
]
FIRST_APPROVAL = "skill_revision.approve_first"


def backfill(apps, schema_editor):
    SkillRevision = apps.get_model("skills", "SkillRevision")
    AuditEvent = apps.get_model("metaclaw_site", "AuditEvent")
    events = AuditEvent.objects.filter(
        object_type="skills.skillrevision", action__in=[*DECISIONS, FIRST_APPROVAL]
    ).order_by("created_at", "id")
    decided: dict[str, str] = {}
    first: dict[str, tuple[str, object]] = {}
    for event in events.iterator():
        if event.action == FIRST_APPROVAL:
            first[event.object_id] = (event.actor_label, event.created_at)
        else:
            decided[event.object_id] = event.actor_label  # the latest wins
    for revision in SkillRevision.objects.filter(
        pk__in=[int(pk) for pk in {*decided, *first} if pk.isdigit()]
    ).iterator():
        key = str(revision.pk)
        if key in decided:
            revision.decided_by_label = decided[key]
        if key in first:
            revision.first_approved_by_label, revision.first_approved_at = first[key]
        revision.save(
            update_fields=["decided_by_label", "first_approved_by_label", "first_approved_at"]
        )


class Migration(migrations.Migration):
    dependencies = [
        ("metaclaw_site", "0001_initial"),
        ("skills", "0003_notification_claimed_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="skillrevision",
            name="decided_by_label",
            field=models.CharField(blank=True, default="", max_length=200),
        ),
        migrations.AddField(
            model_name="skillrevision",
            name="first_approved_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="skillrevision",
            name="first_approved_by_label",
            field=models.CharField(blank=True, default="", max_length=200),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
