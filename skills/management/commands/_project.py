"""The base of the skill library's commands that work on one project, named by ``--project``.
(Django lists no command for a module whose name begins with an underscore.)"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from base.models import Project


class ProjectCommand(BaseCommand):
    """``--project <slug>`` resolved to the project, or the command stops with an error;
    subclasses add their own arguments after it and do their work in ``handle_project``."""

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--project", required=True, help="The project's slug.")

    def handle(self, *args: Any, project: str, **options: Any) -> None:
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"No project with the slug '{project}'.")
        self.handle_project(target, **options)

    def handle_project(self, project: Project, **options: Any) -> None:
        raise NotImplementedError
