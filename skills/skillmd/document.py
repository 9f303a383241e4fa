"""One SKILL.md: read it into a revision's fields, and write a revision back out.

YAML front matter (``name``, ``description``, optional ``category``) and a Markdown body (the
instructions). ``name`` is the slug (Agent Skills require it to match the folder); what else a
revision holds travels under ``metadata`` (``title`` when it differs from the slug,
``examples``). An imported file is kept as it came (``SkillRevision.skill_md``) and written back
unchanged while the revision still says the same, so folded descriptions, nested ``metadata``
and keys MetaClaw does not use (``license``, ``allowed-tools``...) go out byte for byte; a
revision edited since keeps them too, with only what changed written anew.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from base.errors import DomainError
from skills.library.models import Category, SkillRevision
from skills.library.services import SLUG_RE, skill_content_check

FILE_NAME = "SKILL.md"
KNOWN_KEYS = {"name", "description", "category", "metadata"}
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
    # The file as it was read ("" for one rendered here).
    source: str = ""

    @property
    def path(self) -> str:
        return f"skills/{self.slug}/{FILE_NAME}"

    def same_content(self, other: SkillDocument | SkillRevision) -> bool:
        return self.same_front_matter(other) and other.instructions == self.instructions

    def same_front_matter(self, other: SkillDocument | SkillRevision) -> bool:
        return (
            other.name == self.name
            and other.description == self.description
            and other.category == self.category
            and (other.examples or []) == (self.examples or [])
        )


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (``|``), as people write them."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump(front: dict[str, Any]) -> str:
    return yaml.dump(
        front, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100_000
    ).strip()


# --- Reading ----------------------------------------------------------------------------------


def _split(text: str) -> tuple[str, str] | None:
    """The front matter's YAML text and the body, or None without front matter."""
    match = _FRONT_MATTER.match(text.replace("\r\n", "\n").lstrip("\ufeff"))
    return None if match is None else (match.group(1), match.group(2))


def _front(raw: str, where: str) -> dict[str, Any]:
    try:
        front = yaml.safe_load(raw) or {}
    except yaml.YAMLError as exc:
        raise DomainError(
            f"{where}: the front matter is not valid YAML ({exc}).", field=where
        ) from exc
    if not isinstance(front, dict):
        raise DomainError(f"{where}: the front matter must be a mapping.", field=where)
    if not isinstance(front.get("metadata") or {}, dict):
        raise DomainError(f"{where}: 'metadata' must be a mapping.", field=where)
    return front


def _document(front: dict[str, Any], body: str, *, folder: str, source: str) -> SkillDocument:
    metadata = front.get("metadata") or {}
    name = str(front.get("name") or "").strip()
    slug = _slug_for(name, folder)
    examples = metadata.get("examples") or []
    return SkillDocument(
        slug=slug,
        name=str(metadata.get("title") or name or slug).strip(),
        description=str(front.get("description") or "").strip(),
        instructions=body.strip(),
        category=str(front.get("category") or Category.GENERAL).strip(),
        examples=examples if isinstance(examples, list) else [examples],
        ignored_keys=sorted(
            [str(k) for k in front if k not in KNOWN_KEYS]
            + [f"metadata.{k}" for k in metadata if k not in ("title", "examples")]
        ),
        source=source,
    )


def parse(text: str, *, folder: str = "", path: str = "") -> SkillDocument:
    """Read one SKILL.md; ``DomainError`` (field = the path) says what is wrong."""
    where = path or f"{folder or '?'}/{FILE_NAME}"
    split = _split(text)
    if split is None:
        raise DomainError(f"{where}: no YAML front matter between '---' lines.", field=where)
    doc = _document(_front(split[0], where), split[1], folder=folder, source=text)
    if not doc.slug:
        raise DomainError(f"{where}: 'name' is missing.", field=where)
    try:
        skill_content_check(doc)
    except DomainError as exc:
        raise DomainError(f"{where}: {exc}", field=where) from exc
    return doc


def _slug_for(name: str, folder: str) -> str:
    if SLUG_RE.match(name) and len(name) <= 64:
        return name
    if SLUG_RE.match(folder) and len(folder) <= 64:
        return folder
    return re.sub(r"[^a-z0-9]+", "-", (name or folder).lower()).strip("-")[:64].strip("-")


# --- Writing ----------------------------------------------------------------------------------


def render(doc: SkillDocument) -> str:
    """The SKILL.md text of one skill, written from its fields alone."""
    return f"---\n{_dump(_front_for(doc, {}))}\n---\n\n{doc.instructions.strip()}\n"


def _front_for(doc: SkillDocument, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (an imported file's front matter: its order, its other keys) saying what
    ``doc`` says."""
    front = dict(base)
    front["name"] = doc.slug
    front["description"] = doc.description
    if doc.category != Category.GENERAL or "category" in front or not base:
        front["category"] = doc.category
    metadata = dict(front.get("metadata") or {})
    metadata.pop("title", None)
    metadata.pop("examples", None)
    if doc.name != doc.slug:
        metadata["title"] = doc.name
    if doc.examples:
        metadata["examples"] = doc.examples
    if metadata:
        front["metadata"] = metadata
    else:
        front.pop("metadata", None)
    return front


def document_for(revision: SkillRevision) -> SkillDocument:
    return SkillDocument(
        slug=revision.skill.slug,
        name=revision.name,
        description=revision.description,
        instructions=revision.instructions,
        category=revision.category,
        examples=list(revision.examples or []),
        source=revision.skill_md,
    )


def revision_text(revision: SkillRevision) -> str:
    """The SKILL.md of ``revision``: the imported file itself while the revision says what it
    says; else that file with what changed written anew (its other keys and its layout kept);
    else (nothing imported) written from the fields."""
    doc = document_for(revision)
    split = _split(doc.source) if doc.source else None
    if split is None:
        return render(doc)
    raw, body = split
    try:
        front = _front(raw, FILE_NAME)
    except DomainError:
        return render(doc)
    original = _document(front, body, folder=doc.slug, source=doc.source)
    if doc.same_content(original):
        return doc.source
    head = raw if doc.same_front_matter(original) else _dump(_front_for(doc, front))
    if original.instructions != doc.instructions:
        lead = body[: len(body) - len(body.lstrip())]
        trail = body[len(body.rstrip()) :]
        body = f"{lead}{doc.instructions}{trail or chr(10)}"
    return f"---\n{head}\n---\n{body}"
