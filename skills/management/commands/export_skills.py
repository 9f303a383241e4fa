"""Export a project's skill library as folders of SKILL.md and their bundled files (or one
zip)."""

from __future__ import annotations

from pathlib import Path

from base.models import Project
from skills.management.commands._project import ProjectCommand
from skills.skillmd import services as skillmd


class Command(ProjectCommand):
    help = (
        "Write skills/<slug>/SKILL.md and the files bundled with it for every skill of a project "
        "(approved and pending)."
    )

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("destination", help="A folder, or a file ending in .zip.")
        parser.add_argument(
            "--approved-only", action="store_true", help="Leave out skills still pending review."
        )

    def handle_project(self, project: Project, *, destination: str, approved_only: bool, **options):
        files = skillmd.library_export(project, include_pending=not approved_only)
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
