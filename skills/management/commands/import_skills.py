"""Import a skill library (folders of SKILL.md with the files beside them, or a zip of them)
as proposed revisions, reporting what became of every file."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError

from base.errors import DomainError
from base.models import Project
from skills.management.commands._project import ProjectCommand
from skills.skillmd import services as skillmd


class Command(ProjectCommand):
    help = (
        "Import SKILL.md folders into a project as proposed revisions (origin: import), file by "
        "file: a refused file is reported and the rest imported, unless --all-or-nothing."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument(
            "source", help="A folder holding */SKILL.md (a repository checkout), or a .zip."
        )
        parser.add_argument(
            "--all-or-nothing",
            action="store_true",
            help="Import nothing when any file is refused.",
        )

    def handle_project(self, project: Project, *, source: str, all_or_nothing: bool, **options):
        path = Path(source)
        if not path.exists():
            raise CommandError(f"{path} does not exist.")
        try:
            entries = (
                skillmd.read_zip(path.read_bytes()) if path.is_file() else skillmd.read_folder(path)
            )
            report = skillmd.library_import(
                project=project,
                entries=entries,
                all_or_nothing=all_or_nothing,
                actor_label="manage.py import_skills",
            )
        except skillmd.ImportRefused as refused:
            self._files(refused.report)
            raise CommandError(str(refused)) from refused
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        self._files(report)
        for item in report.skills:
            if item.outcome == "refused":
                continue
            note = f" (kept as written, unused: {', '.join(item.ignored_keys)})"
            files = f", {item.files} file(s)" if item.files else ""
            self.stdout.write(
                f"{item.outcome:9} {item.slug} r{item.number}{files}"
                + (note if item.ignored_keys else "")
            )
        refused = len(report.refusals)
        kept = sum(f.outcome == "kept" for f in report.files)
        self.stdout.write(
            f"Imported {report.count('created')} new revision(s) with {kept} bundled file(s); "
            f"{report.count('unchanged')} unchanged; {refused} file(s) refused."
        )

    def _files(self, report: skillmd.ImportReport) -> None:
        for item in report.files:
            if item.outcome in ("refused", "ignored"):
                self.stdout.write(f"{item.outcome:9} {item.path}: {item.reason}")
