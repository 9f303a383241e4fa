"""Projects' upstream API keys are stored encrypted (``base.crypto``): room for the token, and
the plaintext keys stored so far encrypted in place. Reversible: going back decrypts them."""

from __future__ import annotations

from django.db import migrations, models


def encrypt_keys(apps, schema_editor) -> None:
    from base import crypto

    Project = apps.get_model("metaclaw_site", "Project")
    for project in Project.objects.exclude(upstream_api_key="").only("pk", "upstream_api_key"):
        if not crypto.is_encrypted(project.upstream_api_key):
            project.upstream_api_key = crypto.encrypt(project.upstream_api_key)
            project.save(update_fields=["upstream_api_key"])


def decrypt_keys(apps, schema_editor) -> None:
    from base import crypto

    Project = apps.get_model("metaclaw_site", "Project")
    for project in Project.objects.exclude(upstream_api_key="").only("pk", "upstream_api_key"):
        if crypto.is_encrypted(project.upstream_api_key):
            project.upstream_api_key = crypto.decrypt(project.upstream_api_key)[:500]
            project.save(update_fields=["upstream_api_key"])


class Migration(migrations.Migration):
    dependencies = [
        ("metaclaw_site", "0002_grouping_settings"),
    ]

    operations = [
        migrations.AlterField(
            model_name="project",
            name="upstream_api_key",
            field=models.CharField(blank=True, default="", max_length=1000),
        ),
        migrations.RunPython(encrypt_keys, decrypt_keys),
    ]
