"""Import a skill library (folders of SKILL.md, or a zip of them) as proposed revisions."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from base.errors import DomainError
from base.models import Project
from skills.skillmd import services as skillmd


class Command(BaseCommand):
    help = "Import SKILL.md files into a project as proposed revisions (origin: import)."

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="The project's slug.")
        parser.add_argument("source", help="A folder holding */SKILL.md, or a .zip of them.")

    def handle(self, *args, project: str, source: str, **options):
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"No project with the slug '{project}'.")
        path = Path(source)
        if not path.exists():
            raise CommandError(f"{path} does not exist.")
        try:
            files = (
                skillmd.read_zip(path.read_bytes()) if path.is_file() else skillmd.read_folder(path)
            )
            results = skillmd.library_import(
                project=target, files=files, actor_label="manage.py import_skills"
            )
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        for item in results:
            note = f" (ignored: {', '.join(item.ignored_keys)})" if item.ignored_keys else ""
            self.stdout.write(f"{item.outcome:9} {item.slug} r{item.number}{note}")
        created = sum(r.outcome == "created" for r in results)
        self.stdout.write(
            f"Imported {created} new revision(s); {len(results) - created} unchanged."
        )
