"""Import and export a whole skill library as folders of ``SKILL.md`` files.

The format of the published MetaClaw and of Agent Skills: ``skills/<slug>/SKILL.md`` with YAML
front matter (``name``, ``description``, optional ``category``) and a Markdown body (the
instructions). ``name`` is the slug (Agent Skills require it to match the folder); what else a
revision holds travels under ``metadata`` (``title`` when it differs from the slug,
``examples``), so exporting and importing again loses nothing. Front matter keys we do not
store (``license``, ``allowed-tools``...) are reported on import.
"""

from __future__ import annotations

import io
import lzma
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from django.db import transaction

from base.errors import DomainError
from base.models import Project
from base.services import audit_record
from skills.library.models import Author, Category, Origin, RevisionStatus, SkillRevision
from skills.library.services import (
    SLUG_RE,
    RevisionDraft,
    skill_content_validate,
    skill_revision_propose,
)
from skills.versions.models import PolicyVersion, VersionStatus

FILE_NAME = "SKILL.md"
KNOWN_KEYS = {"name", "description", "category", "metadata"}
MAX_FILES = 2000
MAX_TOTAL_BYTES = 20 * 1024 * 1024
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)(.*)\Z", re.DOTALL)


@dataclass
class SkillDocument:
    slug: str
    name: str
    description: str
    instructions: str
    category: str = Category.GENERAL
    examples: list[Any] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"skills/{self.slug}/{FILE_NAME}"

    def same_content(self, revision: SkillRevision) -> bool:
        return (
            revision.name == self.name
            and revision.description == self.description
            and revision.instructions == self.instructions
            and revision.category == self.category
            and (revision.examples or []) == (self.examples or [])
        )


# --- One file -------------------------------------------------------------------------------


def render(doc: SkillDocument) -> str:
    """The SKILL.md text of one skill."""
    front: dict[str, Any] = {
        "name": doc.slug,
        "description": doc.description,
        "category": doc.category,
    }
    metadata: dict[str, Any] = {}
    if doc.name != doc.slug:
        metadata["title"] = doc.name
    if doc.examples:
        metadata["examples"] = doc.examples
    if metadata:
        front["metadata"] = metadata
    head = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=100_000).strip()
    return f"---\n{head}\n---\n\n{doc.instructions.strip()}\n"


def parse(text: str, *, folder: str = "", path: str = "") -> SkillDocument:
    """Read one SKILL.md; ``DomainError`` (field = the path) says what is wrong."""
    where = path or f"{folder or '?'}/{FILE_NAME}"
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    match = _FRONT_MATTER.match(text)
    if match is None:
        raise DomainError(f"{where}: no YAML front matter between '---' lines.", field=where)
    try:
        front = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        raise DomainError(
            f"{where}: the front matter is not valid YAML ({exc}).", field=where
        ) from exc
    if not isinstance(front, dict):
        raise DomainError(f"{where}: the front matter must be a mapping.", field=where)
    metadata = front.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise DomainError(f"{where}: 'metadata' must be a mapping.", field=where)
    name = str(front.get("name") or "").strip()
    slug = _slug_for(name, folder)
    if not slug:
        raise DomainError(f"{where}: 'name' is missing.", field=where)
    examples = metadata.get("examples") or []
    doc = SkillDocument(
        slug=slug,
        name=str(metadata.get("title") or name or slug).strip(),
        description=str(front.get("description") or "").strip(),
        instructions=match.group(2).strip(),
        category=str(front.get("category") or Category.GENERAL).strip(),
        examples=examples if isinstance(examples, list) else [examples],
        ignored_keys=sorted(
            [str(k) for k in front if k not in KNOWN_KEYS]
            + [f"metadata.{k}" for k in metadata if k not in ("title", "examples")]
        ),
    )
    try:
        skill_content_validate(
            slug=doc.slug,
            name=doc.name,
            description=doc.description,
            instructions=doc.instructions,
            category=doc.category,
        )
    except DomainError as exc:
        raise DomainError(f"{where}: {exc}", field=where) from exc
    return doc


def _slug_for(name: str, folder: str) -> str:
    if SLUG_RE.match(name) and len(name) <= 64:
        return name
    if SLUG_RE.match(folder) and len(folder) <= 64:
        return folder
    return re.sub(r"[^a-z0-9]+", "-", (name or folder).lower()).strip("-")[:64].strip("-")


# --- A library ------------------------------------------------------------------------------


def library_revisions(project: Project, *, include_pending: bool = True) -> list[SkillRevision]:
    """Per skill, the revision that stands for it: the one in the active policy, else the
    newest approved, else (with ``include_pending``) the newest proposed."""
    active = PolicyVersion.objects.filter(project=project, status=VersionStatus.ACTIVE).first()
    chosen: dict[int, SkillRevision] = {}
    if active is not None:
        for revision in active.revisions.select_related("skill"):
            chosen[revision.skill_id] = revision
    statuses = [RevisionStatus.APPROVED] + ([RevisionStatus.PROPOSED] if include_pending else [])
    rows = (
        SkillRevision.objects.filter(skill__project=project, status__in=statuses)
        .select_related("skill")
        .order_by("skill_id", "-number")
    )
    in_active = set(chosen)
    for revision in rows:
        if revision.skill_id in in_active:
            continue
        current = chosen.get(revision.skill_id)
        if current is None or (
            current.status == RevisionStatus.PROPOSED and revision.status == RevisionStatus.APPROVED
        ):
            chosen[revision.skill_id] = revision
    return sorted(chosen.values(), key=lambda r: r.skill.slug)


def document_for(revision: SkillRevision) -> SkillDocument:
    return SkillDocument(
        slug=revision.skill.slug,
        name=revision.name,
        description=revision.description,
        instructions=revision.instructions,
        category=revision.category,
        examples=list(revision.examples or []),
    )


def library_export(project: Project, *, include_pending: bool = True) -> dict[str, str]:
    """``{"skills/<slug>/SKILL.md": text}`` for the project's library."""
    files = {}
    for revision in library_revisions(project, include_pending=include_pending):
        doc = document_for(revision)
        files[doc.path] = render(doc)
    return files


def zip_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, files[path])
    return buffer.getvalue()


# What reading a damaged or unusual archive raises besides BadZipFile: RuntimeError (an
# encrypted entry), NotImplementedError (an unsupported compression method), zlib.error and
# EOFError (corrupt or truncated deflate data), OSError / LZMAError (bzip2 / lzma data), and
# ValueError (bad header fields).
_ZIP_READ_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError,
    NotImplementedError,
    zlib.error,
    EOFError,
    OSError,
    lzma.LZMAError,
    ValueError,
)


def read_zip(data: bytes) -> dict[str, str]:
    """The SKILL.md files in a zip archive (other files are ignored)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, *_ZIP_READ_ERRORS) as exc:
        raise DomainError("The upload is not a zip archive.", field="file") from exc
    files: dict[str, str] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            if info.is_dir() or PurePosixPath(info.filename).name != FILE_NAME:
                continue
            total += info.file_size
            if len(files) >= MAX_FILES or total > MAX_TOTAL_BYTES:
                raise DomainError("The archive is too large.", field="file")
            try:
                content = archive.read(info)
            except (zipfile.BadZipFile, *_ZIP_READ_ERRORS) as exc:
                # Corrupt data or CRC, an encrypted entry, an unsupported compression method.
                raise DomainError(
                    f"The archive entry {info.filename[:200]} cannot be read: "
                    f"{type(exc).__name__}.",
                    field="file",
                ) from exc
            files[info.filename] = content.decode("utf-8", "replace")
    return files


def read_folder(root: Path) -> dict[str, str]:
    """Every SKILL.md under ``root`` (a library folder or a ``skills/`` folder)."""
    return {
        str(path.relative_to(root)): path.read_text(encoding="utf-8")
        for path in sorted(root.rglob(FILE_NAME))
    }


def write_folder(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


@dataclass
class ImportedSkill:
    path: str
    slug: str
    outcome: str  # "created" | "unchanged"
    revision_id: int | None
    number: int | None
    ignored_keys: list[str]


def parse_files(files: dict[str, str]) -> list[tuple[str, SkillDocument]]:
    if not files:
        raise DomainError(f"No {FILE_NAME} files found.", field="files")
    if len(files) > MAX_FILES:
        raise DomainError(f"At most {MAX_FILES} skills per import.", field="files")
    docs: list[tuple[str, SkillDocument]] = []
    seen: dict[str, str] = {}
    for path in sorted(files):
        folder = PurePosixPath(path).parent.name
        doc = parse(files[path], folder=folder, path=path)
        if doc.slug in seen:
            raise DomainError(
                f"{path}: the skill '{doc.slug}' is also in {seen[doc.slug]}.", field=path
            )
        seen[doc.slug] = path
        docs.append((path, doc))
    return docs


@transaction.atomic
def library_import(
    *, project: Project, files: dict[str, str], actor: Any = None, actor_label: str = ""
) -> list[ImportedSkill]:
    """Import SKILL.md files as PROPOSED revisions (origin ``import``), all or nothing. A skill
    whose standing revision already has exactly this content is left alone (re-importing an
    export is a no-op). ``actor`` None is a machine actor whose permission the caller checked."""
    docs = parse_files(files)
    standing = {r.skill.slug: r for r in library_revisions(project, include_pending=True)}
    results: list[ImportedSkill] = []
    for path, doc in docs:
        current = standing.get(doc.slug)
        if current is not None and doc.same_content(current):
            results.append(
                ImportedSkill(path, doc.slug, "unchanged", current.pk, current.number, [])
            )
            continue
        revision = skill_revision_propose(
            project=project,
            draft=RevisionDraft(
                slug=doc.slug,
                name=doc.name,
                description=doc.description,
                instructions=doc.instructions,
                category=doc.category,
                examples=doc.examples,
                author=Author.HUMAN,
                origin=Origin.IMPORT,
                parent=current,
            ),
            created_by=actor,
            actor_label=actor_label,
        )
        results.append(
            ImportedSkill(path, doc.slug, "created", revision.pk, revision.number, doc.ignored_keys)
        )
    audit_record(
        action="skill_library.import",
        project=project,
        actor=actor,
        actor_label=actor_label,
        after={
            "created": sum(r.outcome == "created" for r in results),
            "unchanged": sum(r.outcome == "unchanged" for r in results),
        },
    )
    return results
