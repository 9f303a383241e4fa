"""Django's async path (ASGI): every middleware of the stack runs on the event loop, and the
project's own ones answer as they do on the sync path."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync, iscoroutinefunction
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.test import AsyncClient
from django.utils.module_loading import import_string

from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)


def test_every_middleware_of_the_stack_can_run_on_the_event_loop():
    # A sync-only middleware would cost every ASGI request a hop to a thread and back.
    for path in settings.MIDDLEWARE:
        middleware = import_string(path)
        assert getattr(middleware, "async_capable", False), path
    handler = ASGIHandler()
    assert iscoroutinefunction(handler._middleware_chain)


def test_the_api_limits_answer_on_the_async_path():
    client = AsyncClient()

    nul = async_to_sync(client.get)("/api/v1/incidents", {"since": "a\x00b"})
    too_large = async_to_sync(client.post)(
        "/api/v1/incidents",
        data=b"x" * (settings.METACLAW["INGEST_MAX_BODY_BYTES"] + 1),
        content_type="application/json",
    )

    assert nul.status_code == 400 and nul.json()["errors"][0]["field"] == "since"
    assert too_large.status_code == 413 and too_large.json()["code"] == "payload_too_large"


def test_pages_static_files_and_the_api_work_on_the_async_path():
    project = factories.make_project()
    key = factories.make_key(project)
    user = factories.make_member(project, "viewer")
    client = AsyncClient()
    client.force_login(user)

    page = async_to_sync(client.get)(f"/p/{project.slug}/groups/")
    static = async_to_sync(client.get)("/static/metaclaw/htmx.min.js")
    api = async_to_sync(client.post)(
        "/api/v1/incidents",
        factories.incident_payload("async-1"),
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    )

    assert page.status_code == 200 and project.name in page.content.decode()
    assert static.status_code == 200
    assert api.status_code == 202
