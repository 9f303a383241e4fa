"""Skills services: the only code that writes skills, revisions, policy versions and
releases. The dashboard, the API, approval links and Celery tasks all call these."""

from __future__ import annotations

import re

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from incidents.models import Incident, IncidentGroup
from metaclaw_site.models import Project
from metaclaw_site.services import DomainError, audit_record

from . import signals
from .models import (
    Author,
    Category,
    PolicyVersion,
    Release,
    ReleaseKind,
    RevisionStatus,
    Skill,
    SkillRevision,
    VersionStatus,
)


@transaction.atomic
def policy_version_create_initial(*, project: Project) -> PolicyVersion:
    """Version 1 of a new project: no skills, active. Idempotent."""
    existing = PolicyVersion.objects.filter(project=project, number=1).first()
    if existing is not None:
        return existing
    version = PolicyVersion.objects.create(
        project=project,
        number=1,
        status=VersionStatus.ACTIVE,
        status_changed_at=timezone.now(),
        changelog="Initial policy: no skills yet.",
    )
    Release.objects.create(
        project=project, kind=ReleaseKind.INITIAL, to_version=version, actor_label="system"
    )
    audit_record(action="policy_version.create", project=project, obj=version, after={"number": 1})
    return version


# --- Revisions ----------------------------------------------------------------------------

SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
LIMITS = {"name": 120, "description": 500, "instructions": 20_000, "slug": 64}


def skill_content_validate(
    *, slug: str, name: str, description: str, instructions: str, category: str
) -> None:
    """Raise ``DomainError`` (with the field) for content no revision may hold."""
    if not SLUG_RE.match(slug or "") or len(slug) > LIMITS["slug"]:
        raise DomainError(
            "The slug must be lowercase words joined by hyphens (a-z, 0-9), at most 64 characters.",
            field="slug",
        )
    for field_name, value in (
        ("name", name),
        ("description", description),
        ("instructions", instructions),
    ):
        if not (value or "").strip():
            raise DomainError(f"The {field_name} must not be empty.", field=field_name)
        if len(value) > LIMITS[field_name]:
            raise DomainError(
                f"The {field_name} is longer than {LIMITS[field_name]} characters.",
                field=field_name,
            )
    if category not in Category.values:
        raise DomainError(f"Unknown category '{category}'.", field="category")


@transaction.atomic
def skill_revision_propose(
    *,
    project: Project,
    slug: str,
    name: str,
    description: str,
    instructions: str,
    category: str = Category.GENERAL,
    examples: list | None = None,
    author: str = Author.LLM,
    origin: str,
    created_by=None,
    parent: SkillRevision | None = None,
    source_groups: list[IncidentGroup] | None = None,
    source_incidents: list[Incident] | None = None,
    diagnosis: str = "",
    redactions: list | None = None,
    llm_model: str = "",
    prompt_version: str = "",
    tokens_in: int = 0,
    tokens_out: int = 0,
    embedding: list[float] | None = None,
    actor_label: str = "",
) -> SkillRevision:
    """Create a new PROPOSED revision of the skill ``slug`` (creating the skill if new).

    Revisions are immutable: editing, revising after a regression, and importing all come
    through here and make a new row. Announces ``revision_proposed`` after commit."""
    skill_content_validate(
        slug=slug, name=name, description=description, instructions=instructions, category=category
    )
    skill, _ = Skill.objects.get_or_create(
        project=project, slug=slug, defaults={"category": category}
    )
    # Lock the skill so two proposals for it cannot take the same number.
    skill = Skill.objects.select_for_update().get(pk=skill.pk)
    if skill.category != category:
        skill.category = category
        skill.save(update_fields=["category"])
    number = (skill.revisions.aggregate(n=Max("number"))["n"] or 0) + 1
    revision = SkillRevision.objects.create(
        skill=skill,
        number=number,
        parent=parent,
        name=name.strip(),
        description=description.strip(),
        instructions=instructions.strip(),
        examples=examples or [],
        category=category,
        author=author,
        origin=origin,
        created_by=created_by if getattr(created_by, "is_authenticated", False) else None,
        diagnosis=diagnosis,
        redactions=redactions or [],
        llm_model=llm_model,
        prompt_version=prompt_version,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        embedding=embedding,
        status=RevisionStatus.PROPOSED,
        status_changed_at=timezone.now(),
    )
    if source_groups:
        revision.source_groups.set(source_groups)
    if source_incidents:
        revision.source_incidents.set(source_incidents)
    audit_record(
        action="skill_revision.propose",
        project=project,
        actor=created_by,
        actor_label=actor_label,
        obj=revision,
        after={"slug": slug, "number": number, "author": author, "origin": origin},
    )
    transaction.on_commit(
        lambda: signals.revision_proposed.send(sender=SkillRevision, revision=revision), robust=True
    )
    return revision
