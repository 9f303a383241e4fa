"""The skill library's writes: a skill's content checked, and a new proposed revision stored
with its sources and its bundled files (the fast loop, a reviewer's edit and SKILL.md imports
all propose through here). Decisions on a revision are the versions' services."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Protocol

from django.db import connection, transaction
from django.db.models import Max
from django.utils import timezone

from base.errors import DomainError
from base.models import Project
from base.services import audit_record
from incidents.models import Incident, IncidentGroup
from incidents.selectors import incident_messages, message_text
from skills import signals
from skills.library import risk
from skills.library.models import (
    Author,
    Category,
    RevisionStatus,
    Skill,
    SkillFile,
    SkillRevision,
)

# --- Revisions ----------------------------------------------------------------------------

# The Agent Skills specification's name: 1-64 characters, lowercase letters, digits and single
# hyphens, neither first nor last.
SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# What any revision may hold. The description's 1,024 characters are the Agent Skills
# specification's; it sets no limit on the body, and published skills run to 72,000 characters
# (Anthropic's claude-api), so the instructions may be 100,000.
CONTENT_LIMITS = {"name": 120, "description": 1024, "instructions": 100_000, "slug": 64}
# What the fast loop asks its LLM for and clips its drafts to: short enough to inject.
LIMITS = {"name": 120, "description": 500, "instructions": 20_000, "slug": 64}


def skill_content_validate(
    *, slug: str, name: str, description: str, instructions: str, category: str
) -> None:
    """Raise ``DomainError`` (with the field) for content no revision may hold."""
    if not SLUG_RE.match(slug or "") or len(slug) > CONTENT_LIMITS["slug"]:
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
        if len(value) > CONTENT_LIMITS[field_name]:
            raise DomainError(
                f"The {field_name} is {len(value):,} characters long; the limit is "
                f"{CONTENT_LIMITS[field_name]:,}.",
                field=field_name,
            )
    if category not in Category.values:
        raise DomainError(f"Unknown category '{category}'.", field="category")


class SkillContent(Protocol):
    slug: str
    name: str
    description: str
    instructions: str
    category: str


def skill_content_check(content: SkillContent) -> None:
    """``skill_content_validate`` on whatever holds a skill's content: a draft, a parsed
    SKILL.md, an LLM's proposal."""
    skill_content_validate(
        slug=content.slug,
        name=content.name,
        description=content.description,
        instructions=content.instructions,
        category=content.category,
    )


def _skill_lock(*, project: Project, slug: str, category: str) -> tuple[Skill, bool]:
    """The project's skill ``slug`` with ``category``, created if new, its row locked until the
    transaction ends so that two proposals for it cannot take the same revision number."""
    # A concurrent first proposal of the same slug: get_or_create's insert fails on the unique
    # constraint, and it reads (and locks) the winner's row instead.
    skill, created = Skill.objects.select_for_update().get_or_create(
        project=project, slug=slug, defaults={"category": category}
    )
    if skill.category != category:
        skill.category = category
        skill.save(update_fields=["category"])
    return skill, created


def _link_sources(descriptor: Any, revision: SkillRevision, target_ids: list[Any]) -> None:
    through = descriptor.through
    source = f"{descriptor.field.m2m_field_name()}_id"
    target = f"{descriptor.field.m2m_reverse_field_name()}_id"
    # In a stable order, so that concurrent inserts into the link table cannot deadlock.
    through.objects.bulk_create(
        [through(**{source: revision.pk, target: pk}) for pk in sorted(set(target_ids))],
        ignore_conflicts=True,
    )


def _next_revision_number(skill: Skill) -> int:
    # A statement after the lock: it reads what the proposal that held the lock committed.
    highest = SkillRevision.objects.filter(skill=skill).aggregate(Max("number"))["number__max"]
    return (highest or 0) + 1


@dataclass(frozen=True)
class BundledFile:
    """A file that travels with a skill beside its SKILL.md; ``path`` is relative to the
    skill's folder ("scripts/extract.py")."""

    path: str
    content: bytes
    executable: bool = False

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


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
    # How many sessions, end users, agents and keys its incidents came from
    # (``incidents.provenance``), when the fast loop counted them.
    provenance: dict | None = None
    # The LLM's part, when it wrote the draft.
    llm_model: str = ""
    prompt_version: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    embedding: list[float] | None = None
    # The SKILL.md it was imported from, and its bundled files. None: the parent's, so that a
    # reviewer's edit or the fast loop's revision keeps the files and front matter it builds on.
    skill_md: str | None = None
    files: list[BundledFile] | None = None


# No savepoint when nested (the fast loop calls this inside its own transaction): a failure
# here fails the caller's transaction too, which every caller lets propagate anyway.
@transaction.atomic(savepoint=False)
def skill_revision_propose(
    *,
    project: Project,
    draft: RevisionDraft,
    created_by: Any = None,
    actor_label: str = "",
    announce: bool = True,
) -> SkillRevision:
    """Create a new PROPOSED revision of the skill ``draft.slug`` (creating the skill if new).

    Revisions are immutable: editing, revising after a regression, and importing all come
    through here and make a new row. Announces ``revision_proposed`` after commit unless
    ``announce`` is off (an import announces all its revisions at once instead)."""
    skill_content_check(draft)
    parent = draft.parent
    if draft.skill_md is not None:
        skill_md = draft.skill_md
    else:
        skill_md = parent.skill_md if parent is not None else ""
    findings = revision_risk_findings(project=project, draft=draft)
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
        skill_md=skill_md,
        category=draft.category,
        author=draft.author,
        origin=draft.origin,
        created_by=created_by if getattr(created_by, "is_authenticated", False) else None,
        diagnosis=draft.diagnosis,
        redactions=draft.redactions or [],
        provenance=draft.provenance or {},
        llm_model=draft.llm_model,
        prompt_version=draft.prompt_version,
        tokens_in=draft.tokens_in,
        tokens_out=draft.tokens_out,
        embedding=draft.embedding,
        status=RevisionStatus.PROPOSED,
        status_changed_at=timezone.now(),
        risk_findings=findings,
        risk_checked_at=timezone.now(),
    )
    # A new revision has no links yet: one plain insert each (``add`` reads and signals first).
    _link_sources(SkillRevision.source_groups, revision, [g.pk for g in draft.source_groups or []])
    _link_sources(
        SkillRevision.source_incidents, revision, [i.pk for i in draft.source_incidents or []]
    )
    if draft.files is not None:
        _files_store(revision, draft.files)
    elif parent is not None:
        _files_copy(parent, revision)
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
            "risk": _risk_summary(findings),
        },
    )
    if announce:
        transaction.on_commit(
            lambda: signals.revision_proposed.send(sender=SkillRevision, revision=revision),
            robust=True,
        )
    return revision


def untrusted_texts(incidents: list[Incident]) -> list[str]:
    """What traffic wrote in these incidents' conversations: the users' turns and the tool
    results (the risk check compares a skill with them)."""
    texts = []
    for incident in incidents:
        for message in incident_messages(incident):
            if message.get("role") in ("user", "tool", "function"):
                text = message_text(message).strip()
                if text:
                    texts.append(text)
    return texts


def revision_risk_findings(*, project: Project, draft: RevisionDraft) -> list[dict]:
    """The risk check's findings on ``draft`` (``skills.library.risk``) as stored on the
    revision: the project's allow list, and the draft's source incidents as the evidence."""
    findings = risk.risk_check(
        name=draft.name,
        description=draft.description,
        instructions=draft.instructions,
        allowed=risk.allowed_domains(project.risk_allowed_domains),
        untrusted=untrusted_texts(list(draft.source_incidents or [])),
    )
    return [f.as_dict() for f in findings]


def _risk_summary(findings: list[dict]) -> dict:
    kinds = sorted({f["kind"] for f in findings if f["severity"] == risk.FLAG})
    return {"flagged": bool(kinds), "kinds": kinds, "findings": len(findings)}


def _files_store(revision: SkillRevision, files: list[BundledFile]) -> None:
    SkillFile.objects.bulk_create(
        [
            SkillFile(
                revision=revision,
                path=f.path,
                content=f.content,
                size=len(f.content),
                sha256=f.sha256,
                executable=f.executable,
            )
            for f in files
        ],
        batch_size=100,
    )


def _files_copy(parent: SkillRevision, revision: SkillRevision) -> None:
    # In the database: the bytes never pass through this process.
    table = SkillFile._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (revision_id, path, content, size, sha256, executable) "
            f"SELECT %s, path, content, size, sha256, executable FROM {table} "
            "WHERE revision_id = %s",
            [revision.pk, parent.pk],
        )


def revisions_follow_merged_groups(*, target_id: int, source_ids: list[int]) -> int:
    """The revisions proposed for groups that were merged into ``target_id`` are shown on it
    from now on (their links to the merged groups stay: the audit trail names them). Runs in
    the merging transaction. Returns how many links were added."""
    through = SkillRevision.source_groups.through
    revision_ids = set(
        through.objects.filter(incidentgroup_id__in=source_ids).values_list(
            "skillrevision_id", flat=True
        )
    ) - set(
        through.objects.filter(incidentgroup_id=target_id).values_list(
            "skillrevision_id", flat=True
        )
    )
    through.objects.bulk_create(
        [through(skillrevision_id=pk, incidentgroup_id=target_id) for pk in sorted(revision_ids)]
    )
    return len(revision_ids)
