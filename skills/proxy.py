"""The OpenAI-compatible proxy: ``POST /v1/chat/completions``.

An agent adopts MetaClaw by pointing its OpenAI base URL here and sending its project key
(runtime scope). Each request: authenticate (cached), pick the policy (the active one, or the
version pinned with ``X-MetaClaw-Policy-Version`` / ``?version=N``), retrieve the skills relevant
to the user's latest request, append them to the system message as a delimited "Active skills"
section, map the model, forward to the upstream with a pooled ``httpx.AsyncClient`` and relay the
answer untouched (streams chunk by chunk, errors with the upstream's status and body). The turn
is recorded as a trajectory by a background thread, never on the response path.

Two doors lead to the same ``proxy_handle``: the Django view ``chat_completions`` (mounted in
``metaclaw_site/urls.py``), and ``fast_lane``, an ASGI wrapper that the production ASGI app puts in
front of Django so the hot path skips the middleware stack (Django runs sync middleware in a
thread per request, which would cost more than everything else the proxy does).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import certifi
import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import close_old_connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.request import split_domain_port, validate_host
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from pydantic import BaseModel, create_model
from pydantic import ValidationError as PydanticValidationError

from metaclaw_site.api_shapes import (
    domain_error_answer,
    invalid_body,
    parse_json,
    pydantic_errors,
    render_json,
)
from metaclaw_site.auth import RateLimited, ScopeDenied, admit
from metaclaw_site.middleware import api_body_limit, too_large_body
from metaclaw_site.services import DomainError, NotFound

from . import runtime

logger = logging.getLogger(__name__)

PATH = "/v1/chat/completions"
VERSION_HEADER = "X-MetaClaw-Policy-Version"
MAX_BODY_BYTES = 32 * 1024 * 1024
# Upstream response headers worth relaying (rate limits, request ids, retry hints).
RELAYED_HEADERS = ("retry-after", "x-request-id", "openai-processing-ms", "openai-version")
RELAYED_PREFIXES = ("x-ratelimit-",)
_json_loads = json.loads


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


try:  # orjson is several times faster for the request bodies we re-serialize
    import orjson

    _json_loads = orjson.loads

    def _dumps(value: Any) -> bytes:  # noqa: F811
        return orjson.dumps(value)

except ImportError:  # pragma: no cover
    pass


@dataclass
class ProxyResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


def _error(
    status: int, message: str, code: str, *, version: int | None = None, param: str | None = None
) -> ProxyResponse:
    body = {"error": {"message": message, "type": "metaclaw_error", "code": code, "param": param}}
    headers = [("content-type", "application/json")]
    if version is not None:
        headers.append((VERSION_HEADER.lower(), str(version)))
    return ProxyResponse(status, headers, _dumps(body))


# --- Pooled upstream client, one per event loop -------------------------------------------

# httpcore's pool does work proportional to its open connections on every request (it polls
# each idle one), so one pool serving dozens of concurrent requests costs ~3x the CPU of a few
# small ones; requests are spread round-robin over POOL_SHARDS pooled clients.
POOL_SHARDS = 8
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)
_next_shard = itertools.count()


def upstream_client() -> httpx.AsyncClient:
    """A pooled client of the running event loop (created on first use: a client is bound to
    the loop it was created on)."""
    loop = asyncio.get_running_loop()
    clients = _clients.get(loop)
    if clients is None:
        timeout = float(getattr(settings, "UPSTREAM", {}).get("TIMEOUT_SECONDS", 600))
        tls = ssl.create_default_context(cafile=certifi.where())  # loaded once, shared
        clients = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=10.0),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
                trust_env=False,
                verify=tls,
            )
            for _ in range(POOL_SHARDS)
        ]
        _clients[loop] = clients
    return clients[next(_next_shard) % POOL_SHARDS]


# --- The request --------------------------------------------------------------------------


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
    auth = headers.get("authorization", "")
    scheme, _, secret = auth.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None
    api_key = runtime.runtime_key_lookup(secret)
    if api_key is None:
        api_key = await in_worker_thread(runtime.runtime_key_from_db)(secret)
    return api_key


def _pinned_version(headers: dict[str, str], query: str) -> int | None | str:
    raw = headers.get(VERSION_HEADER.lower())
    if raw is None and query:
        values = parse_qs(query).get("version")
        raw = values[-1] if values else None
    if raw is None or raw == "":
        return None
    try:
        number = int(raw)
    except ValueError:
        return "invalid"
    return number if number >= 1 else "invalid"


async def proxy_handle(*, headers: dict[str, str], query: str, body: bytes) -> ProxyResponse:
    """Serve one chat completion. ``headers`` have lower-case names."""
    started = time.perf_counter()
    try:
        api_key = await authenticate(headers)
        if api_key is None:
            return _error(
                401,
                "A valid MetaClaw API key is required (Authorization: Bearer <key>).",
                "invalid_api_key",
            )
        runtime.runtime_admit(api_key)
    except ScopeDenied as exc:
        return _error(403, str(exc), "forbidden")
    except RateLimited as exc:
        response = _error(429, str(exc), "rate_limited")
        response.headers.append(("retry-after", str(exc.retry_after)))
        return response
    project = api_key.project

    pinned = _pinned_version(headers, query)
    if pinned == "invalid":
        return _error(
            422, "The policy version must be a positive integer.", "invalid", param="version"
        )
    snapshot = runtime.policy_snapshot_cached(project_id=project.pk, version=pinned)
    if snapshot is None:
        try:
            snapshot = await in_worker_thread(runtime.policy_snapshot)(
                project_id=project.pk, version=pinned
            )
        except NotFound as exc:
            return _error(404, str(exc), "not_found", param="version")
    version = snapshot.number

    try:
        payload = _json_loads(body)
    except ValueError:
        return _error(400, "The request body is not valid JSON.", "invalid_json", version=version)
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return _error(
            400,
            "'messages' must be a list of chat messages.",
            "invalid",
            version=version,
            param="messages",
        )
    messages: list[Any] = payload["messages"]
    retrieved = runtime.skills_retrieve(
        snapshot=snapshot, query=runtime.query_from_messages(messages)
    )
    if retrieved:
        payload["messages"] = runtime.messages_with_skills(
            messages, runtime.skills_section(retrieved, version=version)
        )
    requested_model = str(payload.get("model") or "")
    upstream = runtime.upstream_for(project)
    payload["model"] = runtime.upstream_model(
        requested=requested_model, snapshot=snapshot, model_map=upstream.model_map
    )
    stream = bool(payload.get("stream"))

    turn = runtime.Turn(
        project_id=project.pk,
        session_id=headers.get("x-session-id", ""),
        turn_type="side" if headers.get("x-turn-type", "").lower() == "side" else "main",
        agent_name=headers.get("x-agent-name", ""),
        policy_version=version,
        requested_model=requested_model,
        model=payload["model"],
        messages=messages,
        tools=payload.get("tools") or [],
        skills=[
            {
                "slug": r.skill.slug,
                "revision": r.skill.revision,
                "revision_id": r.skill.revision_id,
                "score": r.score,
            }
            for r in retrieved
        ],
        status_code=0,
        latency_ms=0.0,
        stream=stream,
        needs_cleaning=b"\\u0000" in body or _json_loads is json.loads,
    )
    if not upstream.base_url:
        turn.status_code, turn.error = 503, "no upstream configured"
        _record(turn, started)
        return _error(
            503,
            "No upstream model is configured (UPSTREAM_BASE_URL or the project's upstream).",
            "no_upstream",
            version=version,
        )

    request_headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "accept-encoding": "identity",
    }
    if upstream.api_key:
        request_headers["authorization"] = f"Bearer {upstream.api_key}"
    for name in ("openai-beta", "openai-organization", "openai-project"):
        if name in headers:
            request_headers[name] = headers[name]
    client = upstream_client()
    request = client.build_request(
        "POST",
        f"{upstream.base_url}/chat/completions",
        content=_dumps(payload),
        headers=request_headers,
    )
    try:
        response = await client.send(request, stream=stream)
    except httpx.TimeoutException as exc:
        turn.status_code, turn.error = 504, f"upstream timeout: {exc!r}"
        _record(turn, started)
        return _error(
            504, "The upstream model did not answer in time.", "upstream_timeout", version=version
        )
    except httpx.HTTPError as exc:
        turn.status_code, turn.error = 502, f"upstream unreachable: {exc!r}"
        _record(turn, started)
        return _error(
            502, "The upstream model could not be reached.", "upstream_unreachable", version=version
        )

    out_headers = [
        ("content-type", response.headers.get("content-type", "application/json")),
        (VERSION_HEADER.lower(), str(version)),
    ]
    for name, value in response.headers.items():
        if name in RELAYED_HEADERS or name.startswith(RELAYED_PREFIXES):
            out_headers.append((name, value))
    turn.status_code = response.status_code

    if not stream or response.status_code >= 400:
        if stream:
            await response.aread()
            await response.aclose()
        turn.response_body = response.content
        turn.stream = False
        _record(turn, started)
        return ProxyResponse(response.status_code, out_headers, response.content)

    out_headers.append(("cache-control", "no-cache"))
    out_headers.append(("x-accel-buffering", "no"))
    return ProxyResponse(response.status_code, out_headers, stream=_relay(response, turn, started))


async def _relay(
    response: httpx.Response, turn: runtime.Turn, started: float
) -> AsyncIterator[bytes]:
    # Runs on the first chunk request, before the client can have seen the end of the stream.
    runtime.recorder.hold()
    chunks: list[bytes] = []
    try:
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            yield chunk
    except httpx.HTTPError as exc:
        turn.error = f"upstream stream broke: {exc!r}"
    finally:
        await response.aclose()
        turn.response_body = b"".join(chunks)
        _record(turn, started, held=True)


def _record(turn: runtime.Turn, started: float, *, held: bool = False) -> None:
    turn.latency_ms = (time.perf_counter() - started) * 1000.0
    turn.occurred_at = timezone.now()
    runtime.recorder.submit(turn, held=held)


# --- Door 1: the Django view --------------------------------------------------------------


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        too_big = len(request.body) > MAX_BODY_BYTES
    except RequestDataTooBig:  # Django's own ceiling (DATA_UPLOAD_MAX_MEMORY_SIZE)
        too_big = True
    if too_big:
        result = _error(413, "Request body too large.", "payload_too_large")
    else:
        result = await proxy_handle(
            headers=headers, query=request.META.get("QUERY_STRING", ""), body=request.body
        )
    response: HttpResponse | StreamingHttpResponse
    if result.stream is not None:
        response = StreamingHttpResponse(result.stream, status=result.status)
    else:
        response = HttpResponse(result.body, status=result.status)
    for name, value in result.headers:
        response[name] = value
    return response


# --- Door 2: the ASGI fast lane -----------------------------------------------------------

AsgiApp = Callable[
    [dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]
]


def fast_lane(
    app: AsgiApp, extra_routes: Mapping[tuple[str, str], Handler] | None = None
) -> AsgiApp:
    """Wrap the Django ASGI app: the agent-facing hot paths (``POST /v1/chat/completions``,
    ``GET /api/v1/runtime/policy``, ``POST /api/v1/runtime/skills/retrieve``, and the
    ``(method, path)`` routes of ``extra_routes``, which the composition root passes in for
    other apps) are served by the same services as the Django views, without the middleware
    stack; everything else by Django. A handler takes ``headers`` (lower-case names),
    ``query`` and ``body`` and answers a ``ProxyResponse``; an API handler authenticates with
    ``api_admit`` and answers errors with ``api_error`` / ``api_invalid``."""
    from . import api_runtime

    routes: dict[tuple[str, str], Handler] = {
        ("POST", PATH): proxy_handle,
        ("GET", "/api/v1/runtime/policy"): api_runtime.fast_policy,
        ("POST", "/api/v1/runtime/skills/retrieve"): api_runtime.fast_retrieve,
        **(extra_routes or {}),
    }

    async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            handler = routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await _serve(handler, scope, receive, send)
                return
        await app(scope, receive, send)

    return asgi


Handler = Callable[..., Awaitable[ProxyResponse]]


def _body_limit(path: str) -> int:
    """The body size Django would accept on ``path`` (the fast lane skips its checks)."""
    if path == PATH:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return MAX_BODY_BYTES if limit is None else min(int(limit), MAX_BODY_BYTES)
    limit = api_body_limit(path)  # ApiBodyLimitMiddleware's
    return int(settings.METACLAW["INGEST_MAX_BODY_BYTES"] if limit is None else limit)


def _host_allowed(scope: dict, headers: dict[str, str]) -> bool:
    """Django's ``ALLOWED_HOSTS`` check (``HttpRequest.get_host``), which the fast lane skips."""
    if settings.USE_X_FORWARDED_HOST and "x-forwarded-host" in headers:
        host = headers["x-forwarded-host"]
    elif "host" in headers:
        host = headers["host"]
    else:
        server = scope.get("server") or ("", None)
        host = f"{server[0]}:{server[1]}" if server[1] not in (None, 80, 443) else str(server[0])
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    domain, _ = split_domain_port(host)
    return bool(domain) and validate_host(domain, allowed)


def _refusal(path: str, status: int, message: str, code: str) -> ProxyResponse:
    """An error in the shape of the door: OpenAI's for the proxy, the API's for the rest."""
    if path == PATH:
        return _error(status, message, code)
    response = api_error(status, message, code)
    if status == 401:
        response.headers.append(("www-authenticate", "Bearer"))
    return response


def _too_large(path: str, length: int) -> ProxyResponse:
    if path == PATH:
        return _error(413, "Request body too large.", "payload_too_large")
    return api_answer(413, too_large_body(length, _body_limit(path)))


async def _refuse_early(scope: dict, headers: dict[str, str]) -> ProxyResponse | None:
    """Refuse what can be refused from the headers alone, before reading any body: a host
    not in ALLOWED_HOSTS, a declared body over the limit, a missing or unknown key."""
    path = scope["path"]
    if not _host_allowed(scope, headers):
        return _refusal(path, 400, "Invalid Host header.", "bad_request")
    declared = headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > _body_limit(path):
        return _too_large(path, int(declared))
    if await authenticate(headers) is None:  # cached: the handler's own check is then free
        if path == PATH:
            return _error(
                401,
                "A valid MetaClaw API key is required (Authorization: Bearer <key>).",
                "invalid_api_key",
            )
        return _refusal(
            path, 401, "A valid API key is required (Authorization: Bearer <key>).", "unauthorized"
        )
    return None


async def _serve(handler: Handler, scope: dict, receive: Callable, send: Callable) -> None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    parts: list[bytes] = []
    size = 0
    more = True
    try:
        result = await _refuse_early(scope, headers)
    except Exception:  # noqa: BLE001 - a 500 that says where, never a dropped connection
        logger.exception("Runtime request %s failed.", scope["path"])
        result = _error(500, "Internal error in MetaClaw's runtime.", "internal_error")
    limit = _body_limit(scope["path"])
    while more and result is None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            result = _too_large(scope["path"], size)
            break
        parts.append(chunk)
        more = message.get("more_body", False)
    if result is None:
        try:
            result = await handler(
                headers=headers,
                query=scope.get("query_string", b"").decode("latin-1"),
                body=b"".join(parts),
            )
        except Exception:  # noqa: BLE001 - a 500 that says where, never a dropped connection
            logger.exception("Runtime request %s failed.", scope["path"])
            result = _error(500, "Internal error in MetaClaw's runtime.", "internal_error")
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in result.headers]
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


# --- API-shaped answers on the fast lane (the runtime API, and routes of other apps) --------
# Same status codes and bodies as the NinjaAPI's handlers in metaclaw_site/api.py.


def api_answer(status: int, body: Any) -> ProxyResponse:
    """``body`` rendered byte for byte as ninja renders it."""
    return ProxyResponse(
        status, [("content-type", "application/json; charset=utf-8")], render_json(body)
    )


def api_error(
    status: int, detail: str, code: str, field: str | None = None, **extra: Any
) -> ProxyResponse:
    body: dict[str, Any] = {"detail": detail, "code": code, **extra}
    if field:
        body["errors"] = [{"field": field, "message": detail, "type": code}]
    return api_answer(status, body)


def api_invalid(exc: Exception) -> ProxyResponse:
    """422 for a pydantic ``ValidationError``, as ninja answers it."""
    return api_answer(422, invalid_body(pydantic_errors(exc)))


def api_domain_error(exc: DomainError) -> ProxyResponse:
    return api_answer(*domain_error_answer(exc))


@functools.cache
def _body_model(schema: type[BaseModel]) -> type[BaseModel]:
    # ninja validates a single body parameter as the field ``payload`` of a model like this one
    return create_model(f"{schema.__name__}Body", payload=(schema, ...))


def api_body(schema: type[BaseModel], body: bytes) -> Any:
    """The request body parsed and validated as ninja does for ``payload: schema`` (the same
    parser, the same error locations), or a ProxyResponse: 400 not JSON, 422 invalid."""
    data: dict[str, Any] = {}
    if body:  # ninja leaves an empty body out: "payload" is then missing
        try:
            data["payload"] = parse_json(body)
        except Exception as exc:  # noqa: BLE001 - ninja answers any parser failure with a 400
            detail = "Cannot parse request body"
            if settings.DEBUG:
                detail += f" ({exc})"
            return api_error(400, detail, "error")
    try:
        return _body_model(schema).model_validate(data).payload  # type: ignore[attr-defined]
    except PydanticValidationError as exc:
        return api_invalid(exc)


async def api_admit(headers: dict[str, str], scopes: tuple[str, ...]) -> Any:
    """The request's API key, or a ProxyResponse refusing it: 401 without a valid key, 403
    without one of ``scopes``, 429 over the rate limit. The request is counted like the Django
    door counts it (``metaclaw_site.auth.admit``), in process so that the event loop never
    waits on Redis."""
    api_key = await authenticate(headers)
    if api_key is None:
        return _refusal(
            "", 401, "A valid API key is required (Authorization: Bearer <key>).", "unauthorized"
        )
    try:
        admit(api_key, scopes, count=runtime.request_count)
    except ScopeDenied as exc:
        return api_error(403, str(exc), "forbidden")
    except RateLimited as exc:
        response = api_error(429, str(exc), "rate_limited", retry_after=exc.retry_after)
        response.headers.append(("retry-after", str(exc.retry_after)))
        return response
    return api_key
