"""Export a project's skill library as folders of SKILL.md and their bundled files (or one
zip)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from base.models import Project
from skills.skillmd import services as skillmd


class Command(BaseCommand):
    help = (
        "Write skills/<slug>/SKILL.md and the files bundled with it for every skill of a project "
        "(approved and pending)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--project", required=True, help="The project's slug.")
        parser.add_argument("destination", help="A folder, or a file ending in .zip.")
        parser.add_argument(
            "--approved-only", action="store_true", help="Leave out skills still pending review."
        )

    def handle(self, *args, project: str, destination: str, approved_only: bool, **options):
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"No project with the slug '{project}'.")
        files = skillmd.library_export(target, include_pending=not approved_only)
        path = Path(destination)
        if path.suffix == ".zip":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(skillmd.zip_bytes(files, files.executable))
        else:
            skillmd.write_folder(path, files, files.executable)
        skills = sum(name.endswith(f"/{skillmd.FILE_NAME}") for name in files)
        self.stdout.write(
            f"Exported {skills} skill(s) and {len(files) - skills} bundled file(s) to {path}."
        )
