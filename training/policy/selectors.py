"""Reads of a project's training policy that the pages, the API and the beat share."""

from __future__ import annotations

from training.policy.models import IdleWindowPolicy


def auto_training_on(policy: IdleWindowPolicy) -> bool:
    """Whether the beat starts (and resumes) runs for the project on its own. A project that
    never saved its training settings has no policy row, and the beat only visits saved ones
    (``training.tasks.check_idle_windows``): it trains only when someone presses “Train now”,
    whatever the unsaved default of ``auto_train`` says. Every page and the API read this, so
    they say the same thing the beat does."""
    return policy.pk is not None and policy.auto_train
