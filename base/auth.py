"""API key authentication for django-ninja, with scopes and a per-key rate limit."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest
from ninja.security import HttpBearer

from base import counters
from base.models import ApiKey
from base.requests import attach_api_key
from base.services import api_key_authenticate


class ScopeDenied(Exception):
    def __init__(self, scope: str) -> None:
        super().__init__(f"This API key lacks the '{scope}' scope.")
        self.scope = scope


class RateLimited(Exception):
    def __init__(self, retry_after: int, limit: int) -> None:
        super().__init__(f"Rate limit of {limit} requests per minute exceeded.")
        self.retry_after = retry_after
        self.limit = limit


def admit(
    api_key: ApiKey, scopes: tuple[str, ...], *, count: Callable[..., int] | None = None
) -> None:
    """Check that ``api_key`` holds one of ``scopes``, count the request and apply the rate
    limit (raises ``ScopeDenied`` / ``RateLimited``). ``count`` counts one request and answers
    the key's count this minute: ``counters.hit`` asks Redis; the ASGI fast lane passes
    ``counters.hit_local``, which never blocks its event loop on the network."""
    if not any(api_key.has_scope(scope) for scope in scopes):
        raise ScopeDenied(scopes[0])
    now = time.time()
    limit = api_key.project.rate_limit_per_minute or settings.METACLAW["RATE_LIMIT_PER_MINUTE"]
    if (count or counters.hit)(key_id=api_key.pk, project_id=api_key.project_id, now=now) > limit:
        raise RateLimited(retry_after=max(1, 60 - int(now) % 60), limit=limit)


def check_key(request: HttpRequest, token: str, scopes: tuple[str, ...]) -> ApiKey | None:
    """Authenticate ``token`` for any of ``scopes``, count the request, apply the rate limit.
    Sets ``request.api_key`` and ``request.project``."""
    api_key = api_key_authenticate(token.strip())
    if api_key is None:
        return None
    admit(api_key, scopes)
    attach_api_key(request, api_key)
    return api_key


class ApiKeyAuth(HttpBearer):
    """``Authorization: Bearer mc_...`` with one of the given scopes."""

    def __init__(self, *scopes: str) -> None:
        super().__init__()
        self.scopes = scopes

    def authenticate(self, request: HttpRequest, token: str) -> ApiKey | None:
        return check_key(request, token, self.scopes)


ingest_auth = ApiKeyAuth("ingest")
read_auth = ApiKeyAuth("ingest", "admin")
runtime_auth = ApiKeyAuth("runtime")
admin_auth = ApiKeyAuth("admin")
