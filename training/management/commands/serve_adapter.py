"""Serve a policy version over an OpenAI-compatible API (its local LoRA adapter, or the base
model alone), optionally pointing the project's proxy at it, so the whole loop runs offline:

    python manage.py serve_adapter acme --set-upstream
    python manage.py serve_adapter acme --version 3 --port 8101     # a candidate, side by side
    python manage.py serve_adapter acme --base --port 8102          # the base model: a baseline

The server answers as the model name the proxy sends for that version
(``skills.runtime.upstream.adapter_model_name``; the base model's name without an adapter).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from base import services as base_services
from base.errors import DomainError
from base.models import Project
from training.backends import serving
from training.runs import selectors


class Command(BaseCommand):
    help = (
        "Serve a policy version (default: the active one) at http://HOST:PORT/v1: its local "
        "LoRA adapter, or the base model alone for a version without one or with --base; "
        "--set-upstream makes the project's proxy forward to it."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        # "--version N" names a policy version here, not Django's own version.
        kwargs.setdefault("conflict_handler", "resolve")
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("project", help="The project's slug.")
        parser.add_argument("--version", type=int, default=None, help="Policy version number.")
        parser.add_argument(
            "--base",
            action="store_true",
            help="Serve the version's base model without its adapter (an A/B baseline).",
        )
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
        base: bool,
        host: str,
        port: int,
        set_upstream: bool,
        **options,
    ):
        target = Project.objects.filter(slug=project).first()
        if target is None:
            raise CommandError(f"No project with the slug '{project}'.")
        try:
            plan = selectors.version_to_serve(target, version, base_only=base)
        except DomainError as exc:
            raise CommandError(str(exc)) from exc
        number = plan.version.number
        if set_upstream and plan.version.adapter_ref and not plan.adapter_dir:
            raise CommandError(
                f"--base with --set-upstream would record the base model's answers as "
                f"v{number}'s, which has an adapter: serve the baseline on a port of its own "
                "and ask it directly."
            )
        if plan.adapter_dir:
            self.stdout.write(
                f"Loading {plan.base_model} with the adapter of v{number} ({plan.adapter_dir})..."
            )
        else:
            self.stdout.write(self.style.WARNING(plan.note))
            self.stdout.write(f"Loading {plan.base_model}...")
        try:
            server = serving.make_server(
                plan.base_model, plan.adapter_dir, host, port, model_id=plan.model_id
            )
        except Exception as exc:  # noqa: BLE001 - a missing model or torch is a usage error here
            raise CommandError(f"Could not load the model: {type(exc).__name__}: {exc}") from exc
        what = "the base model of " if not plan.adapter_dir else ""
        self.stdout.write(
            self.style.SUCCESS(
                f"Serving {what}v{number} at {server.url} as model '{server.model_id}'"
            )
        )
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
