from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.functional import SimpleLazyObject
from whitenoise.middleware import WhiteNoiseMiddleware

from base.api_shapes import ERROR_CODES
from base.models import Project
from base.requests import SiteRequest


class SyncAndAsyncMiddleware:
    """A middleware Django may run either way: under ASGI the whole stack then stays on the event
    loop (a sync-only one costs every request a hop to a thread and back). ``__call__`` returns
    the next middleware's answer, a coroutine when ``get_response`` is one."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, usable on Django's async path too. WhiteNoise's own middleware is sync-only,
    so under ASGI Django would hop to a thread and back for it on every request; here a request
    that is not for a static file goes straight on, and only serving a file leaves the loop."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        super().__init__(get_response)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        if self.autorefresh:  # development: a file-system look-up per request
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve)(static_file, request)
        return await self.get_response(request)


class ApiBodyLimitMiddleware(SyncAndAsyncMiddleware):
    """Answer 413 with a JSON body before reading an over-large API request, and 400 for a
    query string PostgreSQL cannot take. Sync and async, so that under ASGI Django runs the
    whole stack on the event loop instead of a thread per request."""

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        refusal = self._refusal(request)
        if refusal is not None:
            # Under ASGI Django has read the body already; under WSGI nobody has.
            discard_unread_body(request)
            return refusal
        return api_error_as_json(request, self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return api_error_as_json(request, await self.get_response(request))

    def _refusal(self, request: HttpRequest) -> HttpResponse | None:
        # NUL cannot be stored or even compared in PostgreSQL text: refuse it in any query
        # parameter up front instead of failing deep inside a filter with a 500.
        for name, values in request.GET.lists():
            if "\x00" in name or any("\x00" in value for value in values):
                return JsonResponse(
                    {
                        "detail": f"The query parameter '{name.replace(chr(0), '')}' contains "
                        "a NUL character.",
                        "code": "invalid",
                        "errors": [
                            {
                                "field": name.replace("\x00", ""),
                                "message": "NUL character",
                                "type": "invalid",
                            }
                        ],
                    },
                    status=400,
                )
        limit = api_body_limit(request.path)
        if limit is not None:
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > limit:
                return JsonResponse(too_large_body(length, limit), status=413)
        return None


# A refused body is read and discarded up to this many bytes (both doors): a client that
# writes the whole body before it reads the answer (Python's urllib, many SDKs) then gets the
# answer instead of a connection reset. A larger one is cut off.
UNREAD_BODY_DISCARD_BYTES = 16 * 1024 * 1024


def discard_unread_body(request: HttpRequest) -> None:
    """Read and drop what is left of ``request``'s body, up to ``UNREAD_BODY_DISCARD_BYTES``
    (nothing when the client waits for ``100 Continue``: it has not sent the body)."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    expects = request.META.get("HTTP_EXPECT", "").lower() == "100-continue"
    if getattr(request, "_read_started", False) or expects or length > UNREAD_BODY_DISCARD_BYTES:
        return
    while request.read(64 * 1024):
        pass


def api_error_as_json(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    """An API error that is not JSON (Django's HTML 404 and 500 pages, an empty 405) answered
    in the API's error shape, with its status and headers (Allow, Retry-After) kept."""
    if (
        response.status_code < 400
        or not request.path.startswith("/api/")
        or response.get("Content-Type", "").startswith("application/json")
    ):
        return response
    status = response.status_code
    answer = JsonResponse(
        {"detail": response.reason_phrase + ".", "code": ERROR_CODES.get(status, "error")},
        status=status,
    )
    for name in ("Allow", "Retry-After", "WWW-Authenticate"):
        if name in response:
            answer[name] = response[name]
    return answer


SKILL_IMPORT_PATH_END = "/skills/import"


def api_body_limit(path: str) -> int | None:
    """The largest request body accepted on ``path`` (None: not an API path). The ASGI fast
    lane applies the same limits."""
    conf = settings.METACLAW
    if path.startswith("/api/") and path.endswith("/batch"):
        return conf["BATCH_MAX_BODY_BYTES"]
    if path.startswith("/api/") and path.endswith(SKILL_IMPORT_PATH_END):
        # A skill library's zip (a whole repository: scripts, fonts, PDFs beside the SKILL.md
        # files); the import reads it as a stream, past DATA_UPLOAD_MAX_MEMORY_SIZE.
        return conf["SKILL_IMPORT_MAX_BYTES"]
    if path.startswith("/api/"):
        return conf["INGEST_MAX_BODY_BYTES"]
    return None


def too_large_body(length: int, limit: int) -> dict:
    return {
        "detail": f"Request body too large: {length} bytes, the limit is {limit}.",
        "code": "payload_too_large",
        "limit_bytes": limit,
    }


class CurrentProjectMiddleware(SyncAndAsyncMiddleware):
    """Remember the project a signed-in person is looking at (the project switcher)."""

    SESSION_KEY = "current_project_slug"

    def __call__(self, request: HttpRequest) -> Any:
        self._remember(request)
        # Under ASGI this is the next middleware's coroutine, which the caller awaits.
        return self.get_response(request)

    def _remember(self, request: HttpRequest) -> None:
        # Lazy: project pages set it from their URL, so most requests never run this query
        # (and an async request never runs it on the event loop: only sync views read it).
        # The proxy stands in for the Project (or None) it loads on first use.
        current_project = cast("Project | None", SimpleLazyObject(lambda: self._project(request)))
        cast(SiteRequest, request).current_project = current_project

    def _project(self, request: HttpRequest) -> Project | None:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        from base.selectors import projects_for_user

        projects = projects_for_user(user)
        slug = request.session.get(self.SESSION_KEY)
        project = projects.filter(slug=slug).first() if slug else None
        return project or projects.order_by("name").first()


# Seconds a client is asked to wait when the database is unreachable (``Retry-After``).
DATABASE_RETRY_AFTER_SECONDS = 5


class DatabaseUnavailableMiddleware(SyncAndAsyncMiddleware):
    """The database is down or out of connections: ``503`` with ``Retry-After`` (JSON for the
    API, a short page for people) instead of a ``500`` that reads as a bug. Last in
    ``MIDDLEWARE``, so its ``process_exception`` sees a view's error first; the pool's timeout
    (``METACLAW_DB_POOL_TIMEOUT``) bounds how long a request waits before it."""

    def __call__(self, request: HttpRequest) -> Any:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not database_unavailable(exception):
            return None
        import logging

        logging.getLogger(__name__).warning(
            "Database unavailable for %s: %s", request.path, exception
        )
        return database_unavailable_response(request.path)


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database cannot be reached (not a bad query): a connection
    refused or lost, or no connection from the pool in time."""
    from django.db import InterfaceError, OperationalError

    if isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__ or exc
    # PostgreSQL's "class 08" (connection exceptions) and 57P (operator intervention: the
    # server shutting down); a pool timeout and a refused connection carry no SQLSTATE.
    sqlstate = getattr(cause, "sqlstate", None) or ""
    return not sqlstate or sqlstate.startswith(("08", "57P"))


def database_unavailable_response(path: str) -> HttpResponse:
    retry_after = str(DATABASE_RETRY_AFTER_SECONDS)
    message = "The database is unavailable; try again shortly."
    if path.startswith("/api/") or path.startswith("/v1/"):
        response: HttpResponse = JsonResponse(
            {
                "detail": message,
                "code": "database_unavailable",
                "retry_after": DATABASE_RETRY_AFTER_SECONDS,
            },
            status=503,
        )
    else:
        response = HttpResponse(
            "<!doctype html><title>MetaClaw: unavailable</title>"
            f"<h1>Unavailable for a moment</h1><p>{message} This page retries by itself.</p>"
            f'<meta http-equiv="refresh" content="{retry_after}">',
            status=503,
            content_type="text/html; charset=utf-8",
        )
    response["Retry-After"] = retry_after
    return response
