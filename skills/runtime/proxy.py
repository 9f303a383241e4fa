"""The OpenAI-compatible proxy: ``POST /v1/chat/completions``.

An agent adopts MetaClaw by pointing its OpenAI base URL here and sending its project key
(runtime scope). Each request: authenticate (cached), pick the policy (the active one, or the
version pinned with ``X-MetaClaw-Policy-Version`` / ``?version=N``), retrieve the skills relevant
to the user's latest request, append them to the system message as a delimited "Active skills"
section, map the model, forward to the upstream with a pooled ``httpx.AsyncClient`` and relay the
answer untouched (streams chunk by chunk, errors with the upstream's status and body). The turn
is recorded as a trajectory by a background thread, never on the response path.

Two doors lead to the same ``proxy_handle``: the Django view ``chat_completions`` (mounted in
``metaclaw_site/urls.py``), and the ASGI fast lane (``base.fast_lane``), which the
production ASGI app puts in front of Django so the hot path skips the middleware stack (Django
runs sync middleware in a thread per request, which would cost more than everything else the
proxy does). ``ROUTES`` are the skills app's routes on the fast lane: the proxy, behind a door
that refuses in OpenAI's error shape, and the runtime API's (``skills.runtime.api``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qs

import certifi
import httpx
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from base import fast_lane as site_fast_lane
from base.auth import RateLimited, ScopeDenied
from base.errors import NotFound
from base.fast_lane import (
    AsgiApp,
    Door,
    FastResponse,
    Route,
    authenticate,
    in_worker_thread,
)
from skills.runtime import admission, policy, recording, retrieval
from skills.runtime import api as api_runtime
from skills.runtime import upstream as runtime_upstream

logger = logging.getLogger(__name__)

PATH = "/v1/chat/completions"
VERSION_HEADER = "X-MetaClaw-Policy-Version"
# "canary" or "control" while a canary runs and the request names its session (X-Session-Id).
CANARY_HEADER = "X-MetaClaw-Canary"
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


def _error(
    status: int, message: str, code: str, *, version: int | None = None, param: str | None = None
) -> FastResponse:
    body = {"error": {"message": message, "type": "metaclaw_error", "code": code, "param": param}}
    headers = [("content-type", "application/json")]
    if version is not None:
        headers.append((VERSION_HEADER.lower(), str(version)))
    return FastResponse(status, headers, _dumps(body))


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


async def proxy_handle(*, headers: dict[str, str], query: str, body: bytes) -> FastResponse:
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
        admission.runtime_admit(api_key)
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
    session_id = headers.get("x-session-id", "")
    arm = ""
    if pinned is None and session_id:
        # A running canary serves the sessions hashed into its share (stable per session);
        # the turn records the version that served it, so the arms' rates come from versions.
        canary = policy.canary_cached(project_id=project.pk)
        if canary is policy.CANARY_UNKNOWN:
            canary = await in_worker_thread(policy.canary_load)(project_id=project.pk)
        pinned, arm = policy.session_arm(canary, session_id)
    snapshot = policy.policy_snapshot_cached(project_id=project.pk, version=pinned)
    if snapshot is None:
        try:
            snapshot = await in_worker_thread(policy.policy_snapshot)(
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
    retrieval_query = retrieval.query_from_messages(messages)
    retrieved = retrieval.skills_retrieve(
        snapshot=snapshot, query=retrieval_query, margin=retrieval.margin_default()
    )
    if retrieved:
        payload["messages"] = retrieval.messages_with_skills(
            messages, retrieval.skills_section(retrieved, version=version)
        )
    requested_model = str(payload.get("model") or "")
    upstream = runtime_upstream.upstream_for(project)
    payload["model"] = runtime_upstream.upstream_model(
        requested=requested_model, snapshot=snapshot, model_map=upstream.model_map
    )
    stream = bool(payload.get("stream"))

    turn = recording.Turn(
        project_id=project.pk,
        session_id=session_id,
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
                "rank": r.rank,
            }
            for r in retrieved
        ],
        retrieval={
            "query": retrieval_query,
            "min_score": retrieval.min_score_default(),
            "margin": retrieval.margin_default(),
        },
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
    if arm:
        out_headers.append((CANARY_HEADER.lower(), arm))
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
        return FastResponse(response.status_code, out_headers, response.content)

    out_headers.append(("cache-control", "no-cache"))
    out_headers.append(("x-accel-buffering", "no"))
    return FastResponse(response.status_code, out_headers, stream=_relay(response, turn, started))


async def _relay(
    response: httpx.Response, turn: recording.Turn, started: float
) -> AsyncIterator[bytes]:
    # Runs on the first chunk request, before the client can have seen the end of the stream.
    recording.recorder.hold()
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


def _record(turn: recording.Turn, started: float, *, held: bool = False) -> None:
    turn.latency_ms = (time.perf_counter() - started) * 1000.0
    turn.occurred_at = timezone.now()
    recording.recorder.submit(turn, held=held)


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


# --- Door 2: the ASGI fast lane (base.fast_lane) -----------------------------------


class OpenAIDoor(Door):
    """The fast lane's own refusals on the proxy's route, in OpenAI's error shape (the one
    agents' OpenAI clients read), with the body limit the Django view would apply."""

    def body_limit(self, path: str) -> int:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return MAX_BODY_BYTES if limit is None else min(int(limit), MAX_BODY_BYTES)

    def internal_error(self) -> FastResponse:
        return _error(500, "Internal error in MetaClaw's runtime.", "internal_error")

    def refusal(self, status: int, message: str, code: str) -> FastResponse:
        return _error(status, message, code)

    def unauthorized(self) -> FastResponse:
        return _error(
            401,
            "A valid MetaClaw API key is required (Authorization: Bearer <key>).",
            "invalid_api_key",
        )

    def too_large(self, path: str, length: int) -> FastResponse:
        return _error(413, "Request body too large.", "payload_too_large")


ROUTES: dict[tuple[str, str], Route] = {
    ("POST", PATH): Route(proxy_handle, OpenAIDoor()),
    ("GET", "/api/v1/runtime/policy"): Route(api_runtime.fast_policy),
    ("POST", "/api/v1/runtime/skills/retrieve"): Route(api_runtime.fast_retrieve),
}


def fast_lane(app: AsgiApp, extra_routes: Mapping[tuple[str, str], Route] | None = None) -> AsgiApp:
    """``app`` behind the fast lane with the skills app's ``ROUTES`` and ``extra_routes``
    (the production table is built by ``metaclaw_site/asgi.py``)."""
    return site_fast_lane.fast_lane(app, {**ROUTES, **(extra_routes or {})})
