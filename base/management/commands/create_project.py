from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from base import services


class Command(BaseCommand):
    help = "Create a project (and make --owner its admin)."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("--slug", default="")
        parser.add_argument("--owner", default="", help="Username to make admin of the project.")

    def handle(self, *args, name: str, slug: str, owner: str, **options):
        try:
            project = services.project_create(name=name, slug=slug)
            if owner:
                user = get_user_model().objects.filter(username=owner).first()
                if user is None:
                    raise CommandError(f"No user '{owner}'.")
                services.membership_set(project=project, user=user, role="admin")
        except services.DomainError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"Created project {project.name} (slug: {project.slug}).")
