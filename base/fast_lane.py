"""The ASGI fast lane: the agent-facing hot paths served without Django's middleware stack.

Django's stack, even on its async path (every middleware here can run there), costs the proxy,
the runtime API and ingestion two to six times what they cost on this lane
(``benchmarks/runtime.py --door both``, ``benchmarks/ingest.py --door both``). ``fast_lane``
wraps the Django ASGI app: the requests of its route table go to their handler, everything else
to Django. The composition root (``metaclaw_site/asgi.py``) builds the table from the apps'
``ROUTES``.

A handler takes ``headers`` (lower-case names), ``query`` and ``body`` and answers a
``FastResponse``; it is served by the same services as the Django door. The router does what
Django's stack would have done first, with Django's own code where Django has it (the host check
of ``HttpRequest.get_host``, ``SecurityMiddleware``'s HTTPS redirect and headers), then the body
limits and the refusal of a missing or unknown key before reading the body, in the shape of the
route's ``Door``: the API's by default.
API handlers authenticate with ``api_admit``, read the body with ``api_body`` and answer with
``api_answer`` / ``api_error`` / ``api_invalid`` / ``api_domain_error``: the same status codes and
bodies as the NinjaAPI's handlers in ``metaclaw_site/api.py``. Services run on a worker thread
(``in_worker_thread``)."""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.core.signals import setting_changed
from django.db import close_old_connections
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse
from django.middleware.security import SecurityMiddleware
from pydantic import BaseModel, create_model
from pydantic import ValidationError as PydanticValidationError

from base import counters
from base.api_shapes import (
    NOT_AN_OBJECT,
    domain_error_answer,
    invalid_body,
    parse_json,
    pydantic_errors,
    render_json,
)
from base.auth import (
    RateLimited,
    ScopeDenied,
    admit,
    api_key_blocked,
    api_key_failed,
    client_ip,
)
from base.errors import DomainError
from base.middleware import (
    DATABASE_RETRY_AFTER_SECONDS,
    UNREAD_BODY_DISCARD_BYTES,
    api_body_limit,
    database_unavailable,
    too_large_body,
)
from base.services import api_key_authenticate, api_key_cached

logger = logging.getLogger(__name__)


@dataclass
class FastResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[..., Awaitable[FastResponse]]
AsgiApp = Callable[
    [dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]
]


class Door:
    """The shape of the answers the router gives on a route itself, before (or instead of) its
    handler: the API's. A door of another shape (the OpenAI proxy's) overrides these."""

    def body_limit(self, path: str) -> int:
        """The body size Django would accept on ``path``: ApiBodyLimitMiddleware's limit, and
        never more than DATA_UPLOAD_MAX_MEMORY_SIZE (Django refuses a larger body anyway)."""
        limit = api_body_limit(path)
        limit = int(settings.METACLAW["INGEST_MAX_BODY_BYTES"] if limit is None else limit)
        ceiling = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return limit if ceiling is None else min(limit, int(ceiling))

    def refusal(self, status: int, message: str, code: str) -> FastResponse:
        response = api_error(status, message, code)
        if status == 401:
            response.headers.append(("www-authenticate", "Bearer"))
        return response

    def unauthorized(self) -> FastResponse:
        return self.refusal(
            401, "A valid API key is required (Authorization: Bearer <key>).", "unauthorized"
        )

    def too_large(self, path: str, length: int) -> FastResponse:
        return api_answer(413, too_large_body(length, self.body_limit(path)))

    def key_guessing(self, seconds: int) -> FastResponse:
        """429 for an address that sent too many wrong keys (``base.auth``'s throttle)."""
        return self.refusal_with_retry(
            429,
            "Too many requests with an invalid API key from this address; try again in "
            f"{seconds} seconds.",
            "rate_limited",
            seconds,
        )

    def refusal_with_retry(
        self, status: int, message: str, code: str, seconds: int
    ) -> FastResponse:
        response = self.refusal(status, message, code)
        response.headers.append(("retry-after", str(seconds)))
        return response

    def internal_error(self) -> FastResponse:
        return api_error(500, "Internal server error.", "internal_error")


API = Door()


class Route(NamedTuple):
    handler: Handler
    door: Door = API


def fast_lane(app: AsgiApp, routes: Mapping[tuple[str, str], Route]) -> AsgiApp:
    """Wrap the ASGI ``app``: a request whose ``(method, path)`` is in ``routes`` is served by
    that route, everything else by ``app``."""
    table = dict(routes)

    async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            if _is_liveness_probe(scope):
                await _answer_live(send)
                return
            route = table.get((scope["method"], scope["path"]))
            if route is not None:
                await _serve(route, scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi


# Liveness (``/livez``, and ``/healthz?probe=live`` as before) is answered here, before Django:
# no middleware, no thread, no database or Redis, so it answers within a millisecond even while
# the sync thread waits on a database that is down. Readiness goes to Django (``base.views``).
LIVE_BODY = b'{"ok": true, "probe": "live"}'


def _is_liveness_probe(scope: dict) -> bool:
    if scope["method"] not in ("GET", "HEAD"):
        return False
    path = scope["path"]
    return path == "/livez" or (
        path == "/healthz" and b"probe=live" in scope.get("query_string", b"").split(b"&")
    )


async def _answer_live(send: Callable) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(LIVE_BODY)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": LIVE_BODY})


def in_worker_thread(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Run ``func`` on a worker thread, like Django runs a request: with usable connections."""

    def call(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return func(*args, **kwargs)
        finally:
            # With the connection pool, this hands the connection back: an idle executor
            # thread must not keep one (there are more threads than pooled connections).
            close_old_connections()

    return sync_to_async(call, thread_sensitive=False)


async def authenticate(headers: dict[str, str]) -> Any:
    """The API key of ``Authorization: Bearer <key>`` (cached per process), or None."""
    auth = headers.get("authorization", "")
    scheme, _, secret = auth.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None
    api_key = api_key_cached(secret)
    if api_key is None:
        api_key = await in_worker_thread(api_key_authenticate)(secret)
    return api_key


def _django_request(scope: dict) -> ASGIRequest:
    """The request as Django's own checks see it (headers only: the body is not read)."""
    return ASGIRequest(scope, io.BytesIO())


@functools.cache
def _security() -> SecurityMiddleware:
    """Django's SecurityMiddleware, made once: it reads its settings when it is made, so a
    settings change (a test's) makes a new one (``_forget_security``)."""
    return SecurityMiddleware(_never_called)


def _never_called(request: HttpRequest) -> HttpResponse:
    raise AssertionError("the fast lane calls SecurityMiddleware's hooks, never through it")


# What SecurityMiddleware adds to an answer depends on the settings and on whether the request
# came over HTTPS only: computed by Django's code once for each.
_security_headers_by_scheme: dict[bool, list[tuple[bytes, bytes]]] = {}


def _security_headers(request: HttpRequest) -> list[tuple[bytes, bytes]]:
    """The headers Django's SecurityMiddleware adds to every answer it lets through (HSTS,
    nosniff, Referrer-Policy, Cross-Origin-Opener-Policy)."""
    secure = request.is_secure()
    headers = _security_headers_by_scheme.get(secure)
    if headers is None:
        added = _security().process_response(request, HttpResponse(content_type=""))
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in added.items()
            if name.lower() != "content-type"
        ]
        _security_headers_by_scheme[secure] = headers
    return headers


@receiver(setting_changed)
def _forget_security(**kwargs: Any) -> None:
    _security.cache_clear()
    _security_headers_by_scheme.clear()


async def _refuse_early(
    door: Door, scope: dict, headers: dict[str, str], request: HttpRequest
) -> FastResponse | None:
    """Refuse what can be refused from the headers alone, before reading any body: a host
    not in ALLOWED_HOSTS, a declared body over the limit, a missing or unknown key."""
    path = scope["path"]
    try:
        request.get_host()  # Django's ALLOWED_HOSTS check
    except DisallowedHost:
        return door.refusal(400, "Invalid Host header.", "bad_request")
    redirect = _security().process_request(request)  # SECURE_SSL_REDIRECT
    if redirect is not None:
        return FastResponse(redirect.status_code, [("location", redirect["Location"])], b"")
    declared = headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > door.body_limit(path):
        return door.too_large(path, int(declared))
    ip = client_ip(request)
    blocked = _blocked_for(ip)
    if blocked:
        return door.key_guessing(blocked)
    if await authenticate(headers) is None:  # cached: the handler's own check is then free
        if headers.get("authorization", "").strip():
            # A wrong key: counted like the Django door counts it (base.auth), on a worker
            # thread; the block it may start is remembered here, so that the next guesses
            # are refused without a wait on Redis on the event loop.
            seconds = await in_worker_thread(_wrong_key_counted)(ip)
            if seconds:
                _blocked_until[ip] = time.monotonic() + seconds
        return door.unauthorized()
    return None


# Addresses blocked for guessing keys, as this process last heard from the shared counter.
_blocked_until: dict[str, float] = {}


def _blocked_for(ip: str) -> int:
    deadline = _blocked_until.get(ip)
    if deadline is None:
        return 0
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        _blocked_until.pop(ip, None)
        return 0
    return max(1, math.ceil(remaining))


def forget_blocked_addresses() -> None:
    """For tests: forget the blocks this process remembers."""
    _blocked_until.clear()


def _wrong_key_counted(ip: str) -> int:
    # Blocked already (by another process or door), or by this very failure.
    return api_key_blocked(ip) or api_key_failed(ip)


async def _serve(route: Route, scope: dict, receive: Callable, send: Callable) -> None:
    door = route.door
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    parts: list[bytes] = []
    size = 0
    more = True
    request = _django_request(scope)
    try:
        result = await _refuse_early(door, scope, headers, request)
    except Exception as exc:  # noqa: BLE001 - an answer that says what, never a dropped connection
        result = _failure(door, scope["path"], exc)
    limit = door.body_limit(scope["path"])
    while more and result is None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            result = door.too_large(scope["path"], size)
            break
        parts.append(chunk)
        more = message.get("more_body", False)
    if more and result is not None and _closes(scope, headers):
        if not await _discard_body(receive, size, headers):
            return
    if result is None:
        try:
            result = await route.handler(
                headers=headers,
                query=scope.get("query_string", b"").decode("latin-1"),
                body=b"".join(parts),
            )
        except Exception as exc:  # noqa: BLE001 - an answer that says what, never a reset
            result = _failure(door, scope["path"], exc)
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers]
    raw_headers.extend(_security_headers(request))
    if result.stream is None:
        raw_headers.append((b"content-length", str(len(result.body)).encode()))
        await send({"type": "http.response.start", "status": result.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": result.body})
        return
    await send({"type": "http.response.start", "status": result.status, "headers": raw_headers})
    stream = result.stream
    try:
        async for chunk in stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _failure(door: Door, path: str, exc: Exception) -> FastResponse:
    """The answer to a request that raised: 503 with Retry-After when the database cannot be
    reached (as ``DatabaseUnavailableMiddleware`` answers on Django's door), else a 500."""
    if database_unavailable(exc):
        logger.warning("Database unavailable for %s: %s", path, exc)
        return door.refusal_with_retry(
            503, "The database is unavailable; try again shortly.", "database_unavailable",
            DATABASE_RETRY_AFTER_SECONDS,
        )  # fmt: skip
    logger.error("Runtime request %s failed.", path, exc_info=exc)
    return door.internal_error()


def _closes(scope: dict, headers: dict[str, str]) -> bool:
    """Whether the server closes the connection after this answer. On a kept-alive one,
    uvicorn reads what is left of an unread body and drops it; on one it closes, the unread
    bytes make the kernel reset the connection under a client still writing them."""
    return scope.get("http_version") == "1.0" or "close" in headers.get("connection", "").lower()


async def _discard_body(receive: Callable, size: int, headers: dict[str, str]) -> bool:
    """Read and drop the rest of a refused body, up to ``UNREAD_BODY_DISCARD_BYTES``, before
    answering on a connection that then closes: a client that writes the whole body before it
    reads (urllib, which sends ``Connection: close``; many SDKs) then gets the answer, not a
    reset. False when the client went away. A client waiting for ``100 Continue`` has sent
    nothing. Kept-alive connections are answered without reading (``_closes``)."""
    declared = headers.get("content-length", "").strip()
    if headers.get("expect", "").lower() == "100-continue" or (
        declared.isdigit() and int(declared) > UNREAD_BODY_DISCARD_BYTES
    ):
        return True
    while size <= UNREAD_BODY_DISCARD_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return True


# --- API-shaped answers (the runtime API, ingestion) ------------------------------------------
# Same status codes and bodies as the NinjaAPI's handlers in metaclaw_site/api.py.


def api_answer(status: int, body: Any) -> FastResponse:
    """``body`` rendered byte for byte as ninja renders it."""
    return FastResponse(
        status, [("content-type", "application/json; charset=utf-8")], render_json(body)
    )


def api_error(
    status: int, detail: str, code: str, field: str | None = None, **extra: Any
) -> FastResponse:
    body: dict[str, Any] = {"detail": detail, "code": code, **extra}
    if field:
        body["errors"] = [{"field": field, "message": detail, "type": code}]
    return api_answer(status, body)


def api_invalid(exc: Exception) -> FastResponse:
    """422 for a pydantic ``ValidationError``, as ninja answers it."""
    return api_answer(422, invalid_body(pydantic_errors(exc)))


def api_domain_error(exc: DomainError) -> FastResponse:
    return api_answer(*domain_error_answer(exc))


@functools.cache
def _body_model(schema: type[BaseModel]) -> type[BaseModel]:
    # ninja validates a single body parameter as the field ``payload`` of a model like this one
    return create_model(f"{schema.__name__}Body", payload=(schema, ...))


def api_body(schema: type[BaseModel], body: bytes) -> Any:
    """The request body parsed and validated as ninja does for ``payload: schema`` (the same
    parser, the same error locations), or a FastResponse: 400 not JSON, 422 invalid."""
    data: dict[str, Any] = {}
    if body:  # ninja leaves an empty body out: "payload" is then missing
        try:
            data["payload"] = parse_json(body)
        except Exception as exc:  # noqa: BLE001 - ninja answers any parser failure with a 400
            detail = "Cannot parse request body"
            if settings.DEBUG:
                detail += f" ({exc})"
            return api_error(400, detail, "error")
        if data["payload"] is not None and not isinstance(data["payload"], dict):
            return api_answer(422, invalid_body(NOT_AN_OBJECT))
    try:
        return _body_model(schema).model_validate(data).payload  # type: ignore[attr-defined]
    except PydanticValidationError as exc:
        return api_invalid(exc)


async def api_admit(headers: dict[str, str], scopes: tuple[str, ...]) -> Any:
    """The request's API key, or a FastResponse refusing it: 401 without a valid key, 403
    without one of ``scopes``, 429 over the rate limit. The request is counted like the Django
    door counts it (``base.auth.admit``), in process (``counters.hit_local``) so that
    the event loop never waits on Redis."""
    api_key = await authenticate(headers)
    if api_key is None:
        return API.unauthorized()
    try:
        admit(api_key, scopes, count=counters.hit_local)
    except ScopeDenied as exc:
        return api_error(403, str(exc), "forbidden")
    except RateLimited as exc:
        response = api_error(429, str(exc), "rate_limited", retry_after=exc.retry_after)
        response.headers.append(("retry-after", str(exc.retry_after)))
        return response
    return api_key
