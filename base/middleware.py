from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.functional import SimpleLazyObject
from whitenoise.middleware import WhiteNoiseMiddleware

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
        return refusal if refusal is not None else self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        refusal = self._refusal(request)
        return refusal if refusal is not None else await self.get_response(request)

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
