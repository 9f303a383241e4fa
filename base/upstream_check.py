"""The settings page's "Test connection": ask a project's upstream for its models, as the proxy
would reach it, and say what happened in words. Reads only; changes nothing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

from base import outbound, permissions, selectors, services, setting_checks
from base.errors import DomainError
from base.models import Project, Role

UPSTREAM_CHECK_TIMEOUT = 5.0
_CHECK_MAX_BYTES = 1_000_000


@dataclass(frozen=True)
class UpstreamCheck:
    """What a connection test found, in words for the page."""

    ok: bool
    message: str
    url: str = ""
    status: int | None = None
    elapsed_ms: int | None = None
    models: tuple[str, ...] = ()
    key_sent: bool = False
    note: str = ""


def project_upstream_check(
    *,
    project: Project,
    actor: Any,
    base_url: str | None = None,
    api_key: str | None = None,
) -> UpstreamCheck:
    """Ask ``GET <base URL>/models`` of the upstream that the proxy would use with these
    settings, with a short timeout: ``base_url`` and ``api_key`` as typed on the settings
    page, ``None`` for the stored ones (``api_key=""``: test without a key). The same rules as
    the proxy and as saving: the site's key goes only to the site's URL, the stored key only
    to the origin it was given for, and a newly typed URL through the outbound guard.
    Raises PermissionDenied for a non-admin; every other failure is the answer."""
    permissions.require_role(actor, project, Role.ADMIN)
    stored_url = project.upstream_base_url.rstrip("/")
    typed_url = stored_url if base_url is None else base_url
    try:
        url = setting_checks.upstream_base_url_clean(typed_url)
        key = setting_checks.upstream_api_key_clean(api_key) if api_key else ""
    except DomainError as exc:
        return UpstreamCheck(ok=False, message=str(exc))
    global_url = (settings.UPSTREAM["BASE_URL"] or "").rstrip("/")
    target = services.upstream_url_effective(url)
    if not target:
        return UpstreamCheck(
            ok=False,
            message="No upstream is set: enter its base URL (the site has no UPSTREAM_BASE_URL).",
        )
    note = ""
    if api_key is None and project.upstream_api_key:
        given_for = services.upstream_url_effective(stored_url)
        if services.upstream_origin(target) == services.upstream_origin(given_for):
            key = selectors.project_upstream_api_key(project)
        else:
            note = "The stored key was not sent: it goes only to the URL it was given for."
    if not key and target == global_url:
        key = settings.UPSTREAM["API_KEY"] or ""
    guarded = bool(url) and url != stored_url
    return _upstream_get_models(target, key, guarded=guarded, note=note)


def _upstream_get_models(base_url: str, key: str, *, guarded: bool, note: str) -> UpstreamCheck:
    models_url = f"{base_url}/models"
    host = urlsplit(base_url).netloc
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = httpx.Timeout(UPSTREAM_CHECK_TIMEOUT, connect=3.0)
    base = {"url": models_url, "key_sent": bool(key), "note": note}
    started = time.monotonic()
    try:
        http = (
            outbound.client(timeout=timeout)
            if guarded
            else httpx.Client(timeout=timeout, trust_env=False)
        )
        with http, http.stream("GET", models_url, headers=headers) as response:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _CHECK_MAX_BYTES:
                    break
    except outbound.OutboundRefused as exc:
        return UpstreamCheck(ok=False, message=f"Refused: {exc}", **base)
    except httpx.TimeoutException:
        return UpstreamCheck(
            ok=False,
            message=f"No answer from {host} within {UPSTREAM_CHECK_TIMEOUT:g} s.",
            **base,
        )
    except httpx.HTTPError as exc:
        return UpstreamCheck(ok=False, message=f"Could not connect to {host}: {exc}", **base)
    elapsed_ms = round((time.monotonic() - started) * 1000)
    status = response.status_code
    answer = {**base, "status": status, "elapsed_ms": elapsed_ms}
    try:
        payload = json.loads(bytes(body))
    except ValueError:
        payload = None
    if status >= 400:
        detail = _upstream_error_text(payload, bytes(body))
        reason = response.reason_phrase or ""
        if status in (401, 403):
            message = f"The upstream refused the key ({status} {reason}): {detail}"
        elif status == 404:
            message = (
                f"Nothing at {models_url} (404): the base URL is where the OpenAI API starts, "
                "usually ending in /v1."
            )
        else:
            message = f"The upstream answered {status} {reason}: {detail}"
        return UpstreamCheck(ok=False, message=message, **answer)
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return UpstreamCheck(
            ok=False,
            message=f"{host} answered {status}, but not with an OpenAI model list: is the base "
            "URL the one that ends in /v1?",
            **answer,
        )
    models = [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]
    return UpstreamCheck(
        ok=True,
        message=f"{host} answered in {elapsed_ms} ms with "
        f"{len(models)} model{'' if len(models) == 1 else 's'}.",
        models=tuple(models[:50]),
        **answer,
    )


def _upstream_error_text(payload: Any, body: bytes) -> str:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if isinstance(error, str):
            return error[:300]
        if payload.get("message"):
            return str(payload["message"])[:300]
    text = body.decode("utf-8", "replace").strip()
    return text[:300] or "no details."
