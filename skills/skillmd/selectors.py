"""Reads of SKILL.md imports: the progress a page's import records while it runs."""

from __future__ import annotations

from typing import Any

from django.core.cache import cache

from base.models import Project
from skills.skillmd.services import import_progress_key


def import_progress(project: Project, import_id: str) -> dict[str, Any] | None:
    """``{"done", "total", "current", "finished"}`` of the import ``import_id`` of this project
    (``library_import_tracked``), or None before it starts (and an hour after it ends)."""
    return cache.get(import_progress_key(project, import_id))
