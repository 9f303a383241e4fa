"""Word-level diffs of skill texts, and what changes between two policy versions.

Pure functions over already-loaded rows: callers fetch (a fixed number of queries), this module
only compares."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

# Words, runs of whitespace, and single punctuation marks: whitespace is kept so the diff
# re-assembles into the original text exactly.
_TOKEN_RE = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)

DIFF_FIELDS = ("name", "description", "instructions", "category")


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text or "")


@dataclass(frozen=True)
class Chunk:
    op: str  # "equal" | "insert" | "delete"
    text: str


def word_diff(old: str, new: str) -> list[Chunk]:
    """The chunks that turn ``old`` into ``new``, word by word.

    The common prefix and suffix are split off first: edits are usually small, and
    SequenceMatcher is quadratic in the worst case on what remains."""
    a, b = tokenize(old), tokenize(new)
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end = 0
    while end < len(a) - start and end < len(b) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    chunks: list[Chunk] = []
    if start:
        chunks.append(Chunk("equal", "".join(a[:start])))
    chunks.extend(_middle(a[start : len(a) - end], b[start : len(b) - end]))
    if end:
        chunks.append(Chunk("equal", "".join(a[len(a) - end :])))
    return chunks


def _middle(a: list[str], b: list[str]) -> list[Chunk]:
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    chunks: list[Chunk] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            chunks.append(Chunk("equal", "".join(a[i1:i2])))
            continue
        if tag in ("delete", "replace"):
            chunks.append(Chunk("delete", "".join(a[i1:i2])))
        if tag in ("insert", "replace"):
            chunks.append(Chunk("insert", "".join(b[j1:j2])))
    return chunks


def render_chunks(chunks: Iterable[Chunk]) -> SafeString:
    parts = []
    for chunk in chunks:
        text = escape(chunk.text)
        if chunk.op == "insert":
            parts.append(f"<ins>{text}</ins>")
        elif chunk.op == "delete":
            parts.append(f"<del>{text}</del>")
        else:
            parts.append(text)
    return mark_safe("".join(parts))  # noqa: S308 - every piece of text is escaped above


def word_diff_html(old: str, new: str) -> SafeString:
    return render_chunks(word_diff(old, new))


@dataclass
class FieldDiff:
    field: str
    old: str
    new: str

    @cached_property
    def chunks(self) -> list[Chunk]:
        return word_diff(self.old, self.new)

    @cached_property
    def html(self) -> SafeString:
        return render_chunks(self.chunks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "old": self.old,
            "new": self.new,
            "chunks": [{"op": c.op, "text": c.text} for c in self.chunks],
        }


def revision_changes(old: Any, new: Any) -> list[FieldDiff]:
    """The fields that differ between two revisions (of the same skill)."""
    return [
        FieldDiff(name, str(getattr(old, name)), str(getattr(new, name)))
        for name in DIFF_FIELDS
        if getattr(old, name) != getattr(new, name)
    ]


@dataclass
class SkillChange:
    slug: str
    old: Any
    new: Any
    fields: list[FieldDiff]


@dataclass
class VersionDiff:
    old: Any
    new: Any
    added: list[Any] = field(default_factory=list)
    removed: list[Any] = field(default_factory=list)
    changed: list[SkillChange] = field(default_factory=list)
    unchanged: int = 0
    adapter: tuple[str, str] | None = None
    base_model: tuple[str, str] | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.adapter or self.base_model)

    def summary(self) -> list[str]:
        """One line per change, for confirmations ("exactly what changes") and changelogs."""
        lines = [f"adds {r.skill.slug} r{r.number} ({r.name})" for r in self.added]
        lines += [f"removes {r.skill.slug} r{r.number} ({r.name})" for r in self.removed]
        lines += [f"changes {c.slug}: r{c.old.number} → r{c.new.number}" for c in self.changed]
        if self.adapter:
            lines.append(f"adapter {self.adapter[0] or '(none)'} → {self.adapter[1] or '(none)'}")
        if self.base_model:
            lines.append(
                f"base model {self.base_model[0] or '(default)'} → "
                f"{self.base_model[1] or '(default)'}"
            )
        return lines

    def as_dict(self) -> dict[str, Any]:
        def rev(r: Any) -> dict[str, Any]:
            return {"id": r.pk, "skill": r.skill.slug, "number": r.number, "name": r.name}

        return {
            "from": self.old.number,
            "to": self.new.number,
            "added": [rev(r) for r in self.added],
            "removed": [rev(r) for r in self.removed],
            "changed": [
                {
                    "skill": c.slug,
                    "from": rev(c.old),
                    "to": rev(c.new),
                    "fields": [f.as_dict() for f in c.fields],
                }
                for c in self.changed
            ],
            "unchanged": self.unchanged,
            "adapter": {"from": self.adapter[0], "to": self.adapter[1]} if self.adapter else None,
            "base_model": (
                {"from": self.base_model[0], "to": self.base_model[1]} if self.base_model else None
            ),
            "summary": self.summary(),
        }


def version_diff(
    old: Any, new: Any, old_revisions: Iterable[Any], new_revisions: Iterable[Any]
) -> VersionDiff:
    """Compare two versions given their revisions (with ``skill`` loaded), keyed by skill."""
    before = {r.skill_id: r for r in old_revisions}
    after = {r.skill_id: r for r in new_revisions}
    result = VersionDiff(old=old, new=new)
    for skill_id, revision in after.items():
        previous = before.get(skill_id)
        if previous is None:
            result.added.append(revision)
        elif previous.pk == revision.pk:
            result.unchanged += 1
        else:
            result.changed.append(
                SkillChange(
                    slug=revision.skill.slug,
                    old=previous,
                    new=revision,
                    fields=revision_changes(previous, revision),
                )
            )
    result.removed = [r for skill_id, r in before.items() if skill_id not in after]
    for items in (result.added, result.removed):
        items.sort(key=lambda r: r.skill.slug)
    result.changed.sort(key=lambda c: c.slug)
    if (old.adapter_ref or "") != (new.adapter_ref or ""):
        result.adapter = (old.adapter_ref or "", new.adapter_ref or "")
    if (old.base_model or "") != (new.base_model or ""):
        result.base_model = (old.base_model or "", new.base_model or "")
    return result
