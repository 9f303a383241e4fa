"""Load the demo: a project, a login, an API key, realistic incidents, skill proposals and
trajectories. It lives in the project package because it seeds every app.

Idempotent. The login's password and the API key are kept in ``var/demo-credentials.json``
(embedded mode is a local demo) so a second run prints the same ones."""

from __future__ import annotations

import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from base import services
from base.models import ApiKey, Project, Role
from metaclaw_site.projects import project_create
from skills.demo import demo_incidents_load, demo_proposals_load
from training.demo import demo_training_policy_set, demo_trajectories_load


class Command(BaseCommand):
    help = "Load demo data and print a login and an API key."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--quiet", action="store_true")

    def handle(self, *args, username: str, quiet: bool, **options):
        path = settings.VAR_DIR / "demo-credentials.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        with transaction.atomic():
            project = Project.objects.filter(slug="demo").first() or project_create(
                name="Demo agents", slug="demo"
            )
            user_model = get_user_model()
            user = user_model.objects.filter(username=username).first()
            password = saved.get("password") or secrets.token_urlsafe(12)
            if user is None:
                user = services.user_create(username=username, password=password, is_staff=True)
            elif not user.check_password(password):
                user.set_password(password)
                user.save(update_fields=["password"])
            services.membership_set(project=project, user=user, role=Role.ADMIN)
            key = saved.get("api_key")
            if (
                not key
                or not ApiKey.objects.filter(
                    prefix=key.split("_")[1], revoked_at__isnull=True
                ).exists()
            ):
                key = services.api_key_create(
                    project=project, name="demo agent", scopes=["ingest", "runtime", "admin"]
                ).secret
        count = demo_incidents_load(project=project)
        proposals = demo_proposals_load(project=project)
        trajectories = demo_trajectories_load(project=project)
        demo_training_policy_set(project)
        path.write_text(json.dumps({"username": username, "password": password, "api_key": key}))
        path.chmod(0o600)
        if not quiet:
            self.stdout.write(
                f"Demo project '{project.name}': {count} incidents, {proposals} demo skill "
                f"proposals, {trajectories} demo trajectories."
            )
            self.stdout.write(f"Login:    {username} / {password}")
            self.stdout.write(f"API key:  {key}")
