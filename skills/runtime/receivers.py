"""The runtime's side of the skills app's signals."""

from __future__ import annotations

from django.dispatch import receiver

from skills import signals as skill_signals
from skills.runtime.policy import policy_cache_invalidate


@receiver(skill_signals.active_version_changed)
def invalidate_runtime_policy(sender, project_id: int, version_id: int, **kwargs) -> None:
    """Runs after commit. Agents see the new active version at once from this process, and
    within a second from every other web process (the generation counter in Redis)."""
    policy_cache_invalidate(project_id=project_id)
