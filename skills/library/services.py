"""The skill library's writes: a skill's content checked, and a new proposed revision stored
with its sources (the fast loop, a reviewer's edit and SKILL.md imports all propose through
here). Decisions on a revision are the versions' services."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from base.errors import DomainError
from base.models import Project
from base.services import audit_record
from incidents.models import Incident, IncidentGroup
from skills import signals
from skills.library.models import Author, Category, RevisionStatus, Skill, SkillRevision

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


def _skill_lock(*, project: Project, slug: str, category: str) -> tuple[Skill, bool]:
    """The project's skill ``slug`` with ``category``, created if new, its row locked until the
    transaction ends so that two proposals for it cannot take the same revision number."""
    if connection.vendor != "postgresql":
        skill, created = Skill.objects.select_for_update().get_or_create(
            project=project, slug=slug, defaults={"category": category}
        )
        if skill.category != category:
            skill.category = category
            skill.save(update_fields=["category"])
        return skill, created
    # One statement instead of a locking read, a savepoint and an insert: the upsert locks the
    # row either way, and ``xmax = 0`` tells a row it inserted from one it updated.
    table = Skill._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (project_id, slug, category, created_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (project_id, slug) "
            "DO UPDATE SET category = EXCLUDED.category RETURNING id, created_at, xmax = 0",
            [project.pk, slug, category, timezone.now()],
        )
        pk, created_at, created = cursor.fetchone()
    skill = Skill(pk=pk, project=project, slug=slug, category=category, created_at=created_at)
    skill._state.adding, skill._state.db = False, connection.alias
    return skill, created


def _link_sources(descriptor: Any, revision: SkillRevision, target_ids: list[Any]) -> None:
    if not target_ids:
        return
    through = descriptor.through._meta
    source = descriptor.field.m2m_column_name()
    target = descriptor.field.m2m_reverse_name()
    # As the column stores them (SQLite keeps a UUID as its hex digits).
    prep = descriptor.field.target_field.get_db_prep_value
    targets = sorted({prep(pk, connection) for pk in target_ids})
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {through.db_table} ({source}, {target}) VALUES "
            + ", ".join(["(%s, %s)"] * len(targets))
            + " ON CONFLICT DO NOTHING",
            [value for pk in targets for value in (revision.pk, pk)],
        )


def _next_revision_number(skill: Skill) -> int:
    # A statement after the lock: it reads what the proposal that held the lock committed.
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT MAX(number) FROM {SkillRevision._meta.db_table} WHERE skill_id = %s",
            [skill.pk],
        )
        (highest,) = cursor.fetchone()
    return (highest or 0) + 1


@dataclass(frozen=True, kw_only=True)
class RevisionDraft:
    """What a proposed revision says and where it came from: everything but the project and
    who proposes it. The fast loop, a reviewer's edit, SKILL.md imports and the demo each fill
    one in."""

    slug: str
    name: str
    description: str
    instructions: str
    origin: str
    category: str = Category.GENERAL
    examples: list | None = None
    author: str = Author.LLM
    parent: SkillRevision | None = None
    source_groups: list[IncidentGroup] | None = None
    source_incidents: list[Incident] | None = None
    diagnosis: str = ""
    redactions: list | None = None
    # The LLM's part, when it wrote the draft.
    llm_model: str = ""
    prompt_version: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    embedding: list[float] | None = None


# No savepoint when nested (the fast loop calls this inside its own transaction): a failure
# here fails the caller's transaction too, which every caller lets propagate anyway.
@transaction.atomic(savepoint=False)
def skill_revision_propose(
    *, project: Project, draft: RevisionDraft, created_by: Any = None, actor_label: str = ""
) -> SkillRevision:
    """Create a new PROPOSED revision of the skill ``draft.slug`` (creating the skill if new).

    Revisions are immutable: editing, revising after a regression, and importing all come
    through here and make a new row. Announces ``revision_proposed`` after commit."""
    skill_content_validate(
        slug=draft.slug,
        name=draft.name,
        description=draft.description,
        instructions=draft.instructions,
        category=draft.category,
    )
    skill, created = _skill_lock(project=project, slug=draft.slug, category=draft.category)
    number = 1 if created else _next_revision_number(skill)
    revision = SkillRevision.objects.create(
        skill=skill,
        number=number,
        parent=draft.parent,
        name=draft.name.strip(),
        description=draft.description.strip(),
        instructions=draft.instructions.strip(),
        examples=draft.examples or [],
        category=draft.category,
        author=draft.author,
        origin=draft.origin,
        created_by=created_by if getattr(created_by, "is_authenticated", False) else None,
        diagnosis=draft.diagnosis,
        redactions=draft.redactions or [],
        llm_model=draft.llm_model,
        prompt_version=draft.prompt_version,
        tokens_in=draft.tokens_in,
        tokens_out=draft.tokens_out,
        embedding=draft.embedding,
        status=RevisionStatus.PROPOSED,
        status_changed_at=timezone.now(),
    )
    # A new revision has no links yet: one plain insert each (``add`` reads and signals first).
    _link_sources(SkillRevision.source_groups, revision, [g.pk for g in draft.source_groups or []])
    _link_sources(
        SkillRevision.source_incidents, revision, [i.pk for i in draft.source_incidents or []]
    )
    audit_record(
        action="skill_revision.propose",
        project=project,
        actor=created_by,
        actor_label=actor_label,
        obj=revision,
        after={
            "slug": draft.slug,
            "number": number,
            "author": draft.author,
            "origin": draft.origin,
        },
    )
    transaction.on_commit(
        lambda: signals.revision_proposed.send(sender=SkillRevision, revision=revision), robust=True
    )
    return revision
