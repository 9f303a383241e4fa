"""A body over the limit reaches clients that write the whole body before reading the answer
(Python's urllib, many SDKs) as a 413, not as a connection reset: both doors read and discard
it, up to a bound, before answering. Real sockets: Django's door under pytest-django's live
server (WSGI), the fast lane under uvicorn (the production ASGI application)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from django.conf import settings
from django.core.wsgi import get_wsgi_application

from incidents.models import Incident
from tests import factories
from tests.asgi_server import asgi_server

pytestmark = pytest.mark.django_db(transaction=True)

FOUR_MB = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def asgi_url():
    """The production ASGI application (``metaclaw_site.asgi``: the fast lane) under uvicorn."""
    with asgi_server() as url:
        yield url


def post(url: str, body: bytes, key: str) -> tuple[int, dict]:
    """POST with urllib, which sends the whole body before it reads the answer."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def too_large_body() -> bytes:
    padding = "x" * FOUR_MB
    return json.dumps(factories.incident_payload("too-large", metadata={"pad": padding})).encode()


@pytest.fixture(scope="module")
def wsgi_url():
    """Django's WSGI application under the standard library's WSGI server, which, like
    gunicorn, leaves an unread body unread (Django's development server reads it itself, and
    Django's ASGI handler reads every body before the view)."""
    server = make_server("127.0.0.1", 0, get_wsgi_application(), handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("route", ["/api/v1/incidents", "/api/v1/incidents/batch"])
def test_django_door_answers_413_to_a_client_that_writes_the_whole_body_first(
    wsgi_url, ingest_key, route
):
    body = too_large_body() if route.endswith("incidents") else b"[" + b" " * FOUR_MB * 2 + b"]"

    for _ in range(3):  # a reset depends on timing: it came 2 times in 3 before the fix
        status, answer = post(wsgi_url + route, body, ingest_key)

        assert status == 413
        assert answer["code"] == "payload_too_large"


@pytest.mark.parametrize("route", ["/api/v1/incidents", "/api/v1/incidents/batch"])
def test_fast_lane_answers_413_to_a_client_that_writes_the_whole_body_first(
    asgi_url, project, ingest_key, route
):
    body = too_large_body() if route.endswith("incidents") else b"[" + b" " * FOUR_MB * 2 + b"]"

    status, answer = post(asgi_url + route, body, ingest_key)

    assert status == 413
    assert answer == {
        "detail": f"Request body too large: {len(body)} bytes, the limit is "
        f"{settings.METACLAW['BATCH_MAX_BODY_BYTES' if 'batch' in route else 'INGEST_MAX_BODY_BYTES']}.",
        "code": "payload_too_large",
        "limit_bytes": settings.METACLAW[
            "BATCH_MAX_BODY_BYTES" if "batch" in route else "INGEST_MAX_BODY_BYTES"
        ],
    }
    assert not Incident.objects.exists()
