from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from base import services
from base.errors import DomainError
from base.models import ApiKeyScope, Project


class Command(BaseCommand):
    help = "Issue an API key for a project. The secret is printed once and never stored."

    def add_arguments(self, parser):
        parser.add_argument("project", help="Project slug.")
        parser.add_argument("name")
        parser.add_argument(
            "--scope", action="append", choices=ApiKeyScope.values, dest="scopes",
            help="Repeat for several scopes (default: ingest and runtime).",
        )  # fmt: skip

    def handle(self, *args, project: str, name: str, scopes: list[str] | None, **options):
        project_obj = Project.objects.filter(slug=project).first()
        if project_obj is None:
            raise CommandError(f"No project with slug '{project}'.")
        try:
            issued = services.api_key_create(
                project=project_obj, name=name, scopes=scopes or ["ingest", "runtime"]
            )
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(issued.secret)
