"""Create a project with its first policy version (the project package: a project spans apps)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from base import services
from base.errors import DomainError
from metaclaw_site.projects import project_create


class Command(BaseCommand):
    help = "Create a project (and make --owner its admin)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--slug", default="")
        parser.add_argument("--owner", default="", help="Username to make admin of the project.")

    def handle(self, *args, name: str, slug: str, owner: str, **options):
        try:
            project = project_create(name=name, slug=slug)
            if owner:
                user = get_user_model().objects.filter(username=owner).first()
                if user is None:
                    raise CommandError(f"No user '{owner}'.")
                services.membership_set(project=project, user=user, role="admin")
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Created project {project.name} (slug: {project.slug}).")
