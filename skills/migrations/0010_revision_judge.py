from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("skills", "0009_replay_gate_and_canary"),
    ]

    operations = [
        migrations.AddField(
            model_name="skillrevision",
            name="judge_status",
            field=models.CharField(blank=True, default="", max_length=16),
        ),
        migrations.AddField(
            model_name="skillrevision",
            name="judge_verdict",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name="skillrevision",
            name="judge_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="skillrevision",
            index=models.Index(
                condition=models.Q(("judge_status__in", ["pending", "running"])),
                fields=["judge_at"],
                name="revision_judge_waiting",
            ),
        ),
    ]
