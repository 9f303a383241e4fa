from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("skills", "0006_revision_risk_findings"),
    ]

    operations = [
        migrations.AddField(
            model_name="skillrevision",
            name="provenance",
            field=models.JSONField(blank=True, default=dict),
        ),
    ]
