"""API key authentication for django-ninja, with scopes and a per-key rate limit; the login
backend; and the throttles on guessing both (a clear refusal, never a silent one):

- wrong API keys: ``METACLAW["API_KEY_FAILURES_LIMIT"]`` failures from one client address in a
  window of ``API_KEY_FAILURES_WINDOW_SECONDS`` block that address for a window: every request
  with a key is answered 429 (JSON, ``Retry-After``) before any key is looked at, so a guess
  made while blocked is never checked;
- wrong passwords: ``LOGIN_FAILURES_LIMIT`` failures for one username from one address lock
  that pair out for ``LOGIN_LOCKOUT_SECONDS`` (the login form says how long to wait); a
  successful login clears the count.

The counts live in ``base.counters`` (Redis, shared by every process). The client address is
``REMOTE_ADDR``, or behind a reverse proxy the last address of ``METACLAW["CLIENT_IP_HEADER"]``
(a header the proxy sets); IPv6 clients are counted by their /64. The ASGI fast lane
(``base.fast_lane``) counts wrong keys with the same functions, on a worker thread, and keeps the
blocks it hears of in process so that its event loop never waits on Redis."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import ValidationError
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


class KeyGuessingThrottled(RateLimited):
    """Too many wrong API keys from this client address: answered like a rate limit (429,
    ``Retry-After``) by every door that answers ``RateLimited``."""

    def __init__(self, retry_after: int, limit: int) -> None:
        Exception.__init__(
            self,
            f"Too many requests with an invalid API key from this address ({limit} or more); "
            f"try again in {retry_after} seconds.",
        )
        self.retry_after = retry_after
        self.limit = limit


class LoginLockedOut(ValidationError):
    """Raised by ``ThrottledModelBackend`` through ``authenticate()`` into the login form,
    which shows it as a form error (a ``PermissionDenied`` would be shown as a wrong
    password)."""

    def __init__(self, retry_after: int) -> None:
        minutes = max(1, math.ceil(retry_after / 60))
        super().__init__(
            "Too many failed logins for this username from your address. Wait "
            f"{minutes} minute{'s' if minutes != 1 else ''} before trying again.",
            code="locked_out",
        )
        self.retry_after = retry_after


# --- The client's address, as the throttles count it -----------------------------------------


def client_ip(request: HttpRequest | None) -> str:
    """The address the throttles count: ``REMOTE_ADDR``, or the last address of
    ``METACLAW["CLIENT_IP_HEADER"]`` (e.g. ``X-Forwarded-For``: the last entry is the one the
    nearest proxy wrote; earlier ones are the client's to forge). An IPv6 client is its /64,
    which one host usually holds whole."""
    if request is None:
        return "unknown"
    raw = ""
    header = settings.METACLAW["CLIENT_IP_HEADER"]
    if header:
        raw = (request.headers.get(header) or "").split(",")[-1].strip()
    raw = raw or request.META.get("REMOTE_ADDR", "")
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw[:64] or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


# --- Wrong API keys ---------------------------------------------------------------------------


def api_key_blocked(ip: str) -> int:
    """Seconds until ``ip`` may present API keys again; 0 when it may now."""
    return counters.failures_blocked(scope="api_key", subject=ip)


def api_key_failed(ip: str) -> int:
    """Count a wrong API key from ``ip``; the seconds it is now blocked for (0 if not)."""
    return counters.failure_record(
        scope="api_key",
        subject=ip,
        limit=settings.METACLAW["API_KEY_FAILURES_LIMIT"],
        window_seconds=settings.METACLAW["API_KEY_FAILURES_WINDOW_SECONDS"],
    )


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
    Sets ``request.api_key`` and ``request.project``. Raises ``KeyGuessingThrottled`` when the
    client's address sent too many wrong keys, before the key is looked at."""
    ip = client_ip(request)
    blocked = api_key_blocked(ip)
    if blocked:
        raise KeyGuessingThrottled(blocked, settings.METACLAW["API_KEY_FAILURES_LIMIT"])
    api_key = api_key_authenticate(token.strip())
    if api_key is None:
        api_key_failed(ip)
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


# --- Wrong passwords --------------------------------------------------------------------------


def _login_subject(username: str, ip: str) -> str:
    # Hashed: usernames stay out of Redis; case-folded: "Alice" and "alice" share one count.
    return hashlib.sha256(f"{username.casefold()}|{ip}".encode()).hexdigest()[:32]


class ThrottledModelBackend(ModelBackend):
    """Django's username and password check, with the lockout described at the top of this
    module. A locked-out pair is refused before the password is checked, so guesses made while
    locked out are never evaluated. Every login form (the site's, the admin's) shows the
    lockout as a form error."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if username is None:
            username = kwargs.get(get_user_model().USERNAME_FIELD)
        if username is None or password is None:
            return None
        subject = _login_subject(str(username), client_ip(request))
        window = settings.METACLAW["LOGIN_LOCKOUT_SECONDS"]
        blocked = counters.failures_blocked(scope="login", subject=subject)
        if blocked:
            raise LoginLockedOut(blocked)
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            blocked = counters.failure_record(
                scope="login",
                subject=subject,
                limit=settings.METACLAW["LOGIN_FAILURES_LIMIT"],
                window_seconds=window,
            )
            if blocked:
                raise LoginLockedOut(blocked)
            return None
        counters.failures_clear(scope="login", subject=subject, window_seconds=window)
        return user
