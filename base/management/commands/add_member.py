from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from base import services
from base.models import Project, Role


class Command(BaseCommand):
    help = "Give a user a role in a project (creating the user when --password is given)."

    def add_arguments(self, parser):
        parser.add_argument("project", help="Project slug.")
        parser.add_argument("username")
        parser.add_argument("--role", choices=Role.values, default=Role.VIEWER)
        parser.add_argument("--password", default="", help="Create the user with this password.")
        parser.add_argument("--email", default="")

    def handle(
        self, *args, project: str, username: str, role: str, password: str, email: str, **options
    ):
        project_obj = Project.objects.filter(slug=project).first()
        if project_obj is None:
            raise CommandError(f"No project with slug '{project}'.")
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            if not password:
                raise CommandError(f"No user '{username}'; pass --password to create one.")
            user = services.user_create(username=username, password=password, email=email)
        services.membership_set(project=project_obj, user=user, role=role)
        self.stdout.write(f"{username} is now {role} of {project_obj.name}.")
