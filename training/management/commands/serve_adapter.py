"""Serve a policy version's local LoRA adapter over an OpenAI-compatible API, optionally
pointing the project's proxy at it, so the whole loop runs offline:

    python manage.py serve_adapter acme --set-upstream
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from base import services as base_services
from base.errors import DomainError
from base.models import Project
from training.backends import serving
from training.policy import services
from training.runs import selectors


class Command(BaseCommand):
    help = (
        "Serve a policy version's local LoRA adapter (default: the active version) at "
        "http://HOST:PORT/v1; --set-upstream makes the project's proxy forward to it."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        # "--version N" names a policy version here, not Django's own version.
        kwargs.setdefault("conflict_handler", "resolve")
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("project", help="The project's slug.")
        parser.add_argument("--version", type=int, default=None, help="Policy version number.")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8100, help="0 picks a free port.")
        parser.add_argument(
            "--set-upstream",
            action="store_true",
            help="Point the project's upstream at this server (restored when it stops).",
        )

    def handle(
        self,
        *args,
        project: str,
        version: int | None,
        host: str,
        port: int,
        set_upstream: bool,
        **options,
    ):
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"No project with the slug '{project}'.")
        try:
            served = selectors.version_to_serve(target, version)
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        base_model = served.base_model or services.idle_policy_get(target).base_model
        self.stdout.write(
            f"Loading {base_model} with the adapter of v{served.number} ({served.adapter_ref})..."
        )
        try:
            server = serving.make_server(base_model, served.adapter_ref, host, port)
        except Exception as exc:  # noqa: BLE001 - a missing model or torch is a usage error here
            raise CommandError(f"Could not load the model: {type(exc).__name__}: {exc}") from exc
        self.stdout.write(self.style.SUCCESS(f"Serving v{served.number} at {server.url}"))
        previous = target.upstream_base_url
        try:
            if set_upstream:
                base_services.project_upstream_set(
                    project=target, base_url=server.url, actor_label="serve_adapter"
                )
                self.stdout.write(
                    f"{target.name}'s proxy (/v1/chat/completions) now forwards to {server.url}."
                )
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
            if set_upstream:
                self._restore(target, server.url, previous)

    def _restore(self, project: Project, url: str, previous: str) -> None:
        # Only undo our own change: someone may have pointed the proxy elsewhere meanwhile.
        project.refresh_from_db(fields=["upstream_base_url"])
        if project.upstream_base_url == url:
            base_services.project_upstream_set(
                project=project, base_url=previous, actor_label="serve_adapter"
            )
            shown = previous or "the site-wide upstream"
            self.stdout.write(f"{project.name}'s proxy forwards to {shown} again.")
