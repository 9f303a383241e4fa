"""Import and export a whole skill library as folders of ``SKILL.md`` files with the files
bundled beside them (``scripts/``, ``references/``, ``assets/``: the Agent Skills layout).

An import goes file by file: every file of the archive is reported (imported, kept, unchanged,
refused with the reason, or ignored with the reason), a refused SKILL.md leaves the others
importing, and ``all_or_nothing`` refuses the whole import instead when anything is refused. The
reviewers hear of an import once, with the list of its proposals (``revisions_imported``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from django.core.cache import cache
from django.db import transaction

from base.errors import DomainError
from base.models import Project, Role
from base.permissions import require_role
from base.services import audit_record
from skills import signals
from skills.library.models import Author, Origin, RevisionStatus, SkillFile, SkillRevision
from skills.library.services import BundledFile, RevisionDraft, skill_revision_propose
from skills.skillmd.archive import (
    Entry,
    folder_of,
    path_refusal,
    read_folder,
    read_zip,
    skill_root,
    skill_roots,
    write_folder,
    zip_bytes,
)
from skills.skillmd.document import (
    FILE_NAME,
    KNOWN_KEYS,
    SkillDocument,
    document_for,
    parse,
    render,
    revision_text,
)
from skills.versions.models import PolicyVersion, VersionStatus

__all__ = [
    "FILE_NAME",
    "KNOWN_KEYS",
    "Entry",
    "SkillDocument",
    "document_for",
    "parse",
    "read_folder",
    "read_zip",
    "render",
    "revision_text",
    "write_folder",
    "zip_bytes",
]

MAX_SKILLS = 2000
MAX_FILES_PER_SKILL = 1000
MAX_PATH = 255  # SkillFile.path

# ``progress(done, total, current_path)``: files of the import settled so far, of all of them.
Progress = Callable[[int, int, str], None]
# A page's import records its progress here for the page's poll, a request beside the upload's;
# an hour outlives any import and lets an abandoned entry go.
PROGRESS_SECONDS = 3600


# --- Export ---------------------------------------------------------------------------------


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


class ExportedLibrary(dict[str, str | bytes]):
    """``{"skills/<slug>/SKILL.md": text, "skills/<slug>/scripts/x.py": bytes, ...}``;
    ``executable``: the paths to write as executable."""

    executable: frozenset[str] = frozenset()


def library_export(project: Project, *, include_pending: bool = True) -> ExportedLibrary:
    """The project's library: each standing revision's SKILL.md and its bundled files."""
    revisions = library_revisions(project, include_pending=include_pending)
    files = ExportedLibrary()
    folders = {}
    for revision in revisions:
        folder = f"skills/{revision.skill.slug}"
        folders[revision.pk] = folder
        files[f"{folder}/{FILE_NAME}"] = revision_text(revision)
    executable = set()
    bundled = SkillFile.objects.filter(revision__in=list(folders)).values_list(
        "revision_id", "path", "content", "executable"
    )
    for revision_id, path, content, is_executable in bundled.iterator(chunk_size=50):
        target = f"{folders[revision_id]}/{path}"
        files[target] = bytes(content)
        if is_executable:
            executable.add(target)
    files.executable = frozenset(executable)
    return files


# --- Import: the plan -----------------------------------------------------------------------


@dataclass
class FileOutcome:
    """What became of one file of an import."""

    path: str
    # "created" / "unchanged" / "refused" for a SKILL.md; "kept" / "unchanged" / "refused" for
    # a file beside one; "ignored" for a file of no skill.
    outcome: str
    skill: str = ""
    reason: str = ""
    size: int | None = None


@dataclass
class ImportedSkill:
    path: str
    slug: str
    outcome: str  # "created" | "unchanged" | "refused"
    revision_id: int | None
    number: int | None
    ignored_keys: list[str]
    reason: str = ""
    files: int = 0


@dataclass
class ImportReport:
    skills: list[ImportedSkill] = field(default_factory=list)
    files: list[FileOutcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(s.outcome == outcome for s in self.skills)

    @property
    def refusals(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome == "refused"]


class ImportRefused(DomainError):
    """``all_or_nothing`` and something was refused: nothing was imported. ``report`` says
    what was refused and why, file by file."""

    def __init__(self, report: ImportReport) -> None:
        refused = report.refusals
        reasons = "; ".join(f"{f.path}: {f.reason}" for f in refused[:20])
        more = f" (and {len(refused) - 20} more)" if len(refused) > 20 else ""
        super().__init__(
            f"{len(refused)} file(s) refused, so nothing was imported (all or nothing): "
            f"{reasons}{more}",
            field=refused[0].path,
        )
        self.report = report


@dataclass
class _Planned:
    path: str
    doc: SkillDocument
    files: list[BundledFile] = field(default_factory=list)


def _read_skill_md(entry: Entry, folder: str) -> SkillDocument:
    try:
        text = (entry.content or b"").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DomainError(f"{entry.path}: not UTF-8 text.", field=entry.path) from exc
    if "\x00" in text:
        raise DomainError(f"{entry.path}: contains a NUL character.", field=entry.path)
    return parse(text, folder=folder, path=entry.path)


def _plan(entries: list[Entry]) -> tuple[list[_Planned], dict[str, FileOutcome]]:
    """Which skills an import holds and the files of each, and the outcome of every file that
    is settled before anything is written (refused, ignored), by path."""
    settled: dict[str, FileOutcome] = {}
    readable = []
    for entry in sorted(entries, key=lambda e: e.path):
        if entry.ignored:
            settled[entry.path] = FileOutcome(entry.path, "ignored", reason=entry.ignored)
        elif entry.refusal:
            settled[entry.path] = FileOutcome(entry.path, "refused", reason=entry.refusal)
        else:
            readable.append(entry)
    skill_entries = [e for e in readable if PurePosixPath(e.path).name == FILE_NAME]
    if not skill_entries:
        raise DomainError(f"No {FILE_NAME} files found.", field="files")
    if len(skill_entries) > MAX_SKILLS:
        raise DomainError(f"At most {MAX_SKILLS} skills per import.", field="files")
    # folder -> its skill, None when refused (unread too: a symbolic link, too large)
    roots: dict[str, _Planned | None] = {
        folder_of(path): None
        for path, outcome in settled.items()
        if outcome.outcome == "refused" and PurePosixPath(path).name == FILE_NAME
    }
    slugs: dict[str, str] = {}
    for entry in skill_entries:
        folder = folder_of(entry.path)
        try:
            doc = _read_skill_md(entry, PurePosixPath(folder).name)
            if doc.slug in slugs:
                raise DomainError(f"the skill '{doc.slug}' is also in {slugs[doc.slug]}.")
        except DomainError as exc:
            reason = str(exc).removeprefix(f"{entry.path}: ")
            settled[entry.path] = FileOutcome(entry.path, "refused", reason=reason)
            roots[folder] = None
            continue
        slugs[doc.slug] = entry.path
        roots[folder] = _Planned(entry.path, doc)
    folders = set(roots)
    for entry in readable:
        if PurePosixPath(entry.path).name == FILE_NAME:
            continue  # planned or refused above
        folder = skill_root(entry.path, folders)
        planned = roots.get(folder) if folder is not None else None
        relative = entry.path[len(folder) + 1 :] if folder else entry.path
        refusal = ""
        if planned is None:
            refusal = "its skill's SKILL.md was refused"
        elif len(relative) > MAX_PATH:
            refusal = f"a path longer than {MAX_PATH} characters"
        elif len(planned.files) >= MAX_FILES_PER_SKILL:
            refusal = f"more than {MAX_FILES_PER_SKILL} files in one skill"
        if refusal:
            settled[entry.path] = FileOutcome(entry.path, "refused", reason=refusal)
            continue
        assert planned is not None and entry.content is not None
        planned.files.append(BundledFile(relative, entry.content, entry.executable))
    return [p for p in roots.values() if p is not None], settled


# --- Import: the writes ---------------------------------------------------------------------


def _standing_files(revisions: list[SkillRevision]) -> dict[int, set[tuple[str, str, bool]]]:
    files: dict[int, set[tuple[str, str, bool]]] = {r.pk: set() for r in revisions}
    rows = SkillFile.objects.filter(revision__in=revisions).values_list(
        "revision_id", "path", "sha256", "executable"
    )
    for revision_id, path, sha256, executable in rows:
        files[revision_id].add((path, sha256, executable))
    return files


def library_import(
    *,
    project: Project,
    entries: list[Entry],
    all_or_nothing: bool = False,
    actor: Any = None,
    actor_label: str = "",
    progress: Progress | None = None,
) -> ImportReport:
    """Import SKILL.md files and the files beside them as PROPOSED revisions (origin
    ``import``), file by file: what is refused is reported and the rest imported; with
    ``all_or_nothing`` a refusal raises ``ImportRefused`` and nothing is written. A skill whose
    standing revision would export exactly this folder is left alone (re-importing an export is
    a no-op). ``actor`` None is a machine actor whose permission the caller checked.
    ``progress`` hears how many files are settled after each skill written, ending at all.
    A person importing needs the admin role, as an API key needs the admin scope."""
    require_role(actor, project, Role.ADMIN)
    planned, settled = _plan(entries)
    report = ImportReport()
    if all_or_nothing and any(f.outcome == "refused" for f in settled.values()):
        report.files = sorted(settled.values(), key=lambda f: f.path)
        raise ImportRefused(report)
    with transaction.atomic():
        _write(
            project,
            planned,
            settled,
            report,
            actor=actor,
            actor_label=actor_label,
            skill_written=_counted(progress, len(entries), planned),
        )
    report.files = sorted(settled.values(), key=lambda f: f.path)
    if progress is not None:
        progress(len(entries), len(entries), "")
    return report


def _counted(
    progress: Progress | None, total: int, planned: list[_Planned]
) -> Callable[[_Planned], None]:
    """What ``_write`` calls per skill written, feeding ``progress``: the files settled while
    planning (ignored, refused) count from the start, each skill adds its SKILL.md and the
    files beside it."""
    done = max(0, total - sum(1 + len(p.files) for p in planned))
    if progress is not None:
        progress(done, total, "")

    def skill_written(item: _Planned) -> None:
        nonlocal done
        done = min(total, done + 1 + len(item.files))
        if progress is not None:
            progress(done, total, item.path)

    return skill_written


def import_progress_key(project: Project, import_id: str) -> str:
    return f"skillmd-import:{project.pk}:{import_id}"


def import_progress_recorder(project: Project, import_id: str) -> Progress:
    """A ``progress`` for ``library_import`` that records under ``import_id`` what
    ``selectors.import_progress`` reads from another request while the import runs."""
    key = import_progress_key(project, import_id)

    def record(done: int, total: int, current: str) -> None:
        state = {"done": done, "total": total, "current": current, "finished": False}
        cache.set(key, state, PROGRESS_SECONDS)

    return record


def library_import_tracked(*, project: Project, import_id: str, **kwargs: Any) -> ImportReport:
    """``library_import`` recording its progress under ``import_id`` (the page's), marked
    finished however it ends (a refusal too), so that the page's poll stops."""
    key = import_progress_key(project, import_id)
    record = import_progress_recorder(project, import_id)
    record(0, len(kwargs.get("entries", [])), "")
    try:
        return library_import(project=project, progress=record, **kwargs)
    finally:
        state = cache.get(key) or {"done": 0, "total": 0}
        cache.set(key, {**state, "current": "", "finished": True}, PROGRESS_SECONDS)


def _write(
    project: Project,
    planned: list[_Planned],
    settled: dict[str, FileOutcome],
    report: ImportReport,
    *,
    actor: Any,
    actor_label: str,
    skill_written: Callable[[_Planned], None],
) -> None:
    standing = {r.skill.slug: r for r in library_revisions(project, include_pending=True)}
    standing_files = _standing_files(list(standing.values()))
    created: list[int] = []
    for item in sorted(planned, key=lambda p: p.path):
        doc, current = item.doc, standing.get(item.doc.slug)
        folder = item.path[: -len(FILE_NAME)]
        files = {(f.path, f.sha256, f.executable) for f in item.files}
        if (
            current is not None
            and revision_text(current) == doc.source
            and standing_files[current.pk] == files
        ):
            outcome, revision = "unchanged", current
        else:
            outcome = "created"
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
                    skill_md=doc.source,
                    files=item.files,
                ),
                created_by=actor,
                actor_label=actor_label,
                announce=False,
            )
            created.append(revision.pk)
        report.skills.append(
            ImportedSkill(
                item.path,
                doc.slug,
                outcome,
                revision.pk,
                revision.number,
                doc.ignored_keys if outcome == "created" else [],
                files=len(item.files),
            )
        )
        settled[item.path] = FileOutcome(
            item.path, outcome, skill=doc.slug, size=len(doc.source.encode())
        )
        for bundled in item.files:
            path = folder + bundled.path
            kept = "kept" if outcome == "created" else "unchanged"
            settled[path] = FileOutcome(path, kept, skill=doc.slug, size=len(bundled.content))
        skill_written(item)
    for path, outcome in settled.items():
        if outcome.outcome == "refused" and PurePosixPath(path).name == FILE_NAME:
            report.skills.append(
                ImportedSkill(path, "", "refused", None, None, [], reason=outcome.reason)
            )
    audit_record(
        action="skill_library.import",
        project=project,
        actor=actor,
        actor_label=actor_label,
        after={
            "created": report.count("created"),
            "unchanged": report.count("unchanged"),
            "refused": sum(f.outcome == "refused" for f in settled.values()),
            "files_kept": sum(f.outcome == "kept" for f in settled.values()),
        },
    )
    if created:
        transaction.on_commit(
            lambda: signals.revisions_imported.send(
                sender=SkillRevision,
                project_id=project.pk,
                revision_ids=created,
                actor_label=actor_label,
            ),
            robust=True,
        )


def entries_from_texts(files: dict[str, str]) -> list[Entry]:
    """``{path: text}`` (the API's JSON form: SKILL.md files, and text files beside them) as
    archive entries."""
    roots = skill_roots(list(files))
    entries = []
    for path, text in files.items():
        if skill_root(path, roots) is None:
            entries.append(
                Entry(path, ignored="not inside a skill's folder (no SKILL.md above it)")
            )
        elif reason := path_refusal(path):
            entries.append(Entry(path, refusal=reason))
        else:
            entries.append(Entry(path, text.encode("utf-8", "surrogatepass")))
    return entries
