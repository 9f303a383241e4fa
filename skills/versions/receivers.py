"""The versions' side of the project's life: every project has a policy from its first moment."""

from __future__ import annotations

from django.db.models.signals import post_save
from django.dispatch import receiver

from base.models import Project


@receiver(post_save, sender=Project)
def create_initial_policy_version(sender, instance: Project, created: bool, **kwargs) -> None:
    """Every project has exactly one active policy version from its first moment (v1, empty)."""
    if created:
        from skills.versions.services import policy_version_create_initial

        policy_version_create_initial(project=instance)
