"""A whole new project: its row and audit event (``base``) and its first policy version
(``skills``: v1, empty and active), in one transaction. A project spans apps, so making one is
composed here, in the one package that may import them all."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from base.models import Project
from base.services import project_row_create
from skills.versions.services import policy_version_create_initial


@transaction.atomic
def project_create(*, name: str, slug: str = "", actor: Any = None) -> Project:
    """A project with its v1 policy. Refuses an empty name or a slug in use (DomainError)."""
    project = project_row_create(name=name, slug=slug, actor=actor)
    policy_version_create_initial(project=project)
    return project
