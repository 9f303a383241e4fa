"""Tenancy and audit services: the only code that writes projects, memberships, keys and
audit events."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from base import crypto, outbound, permissions, selectors
from base.errors import Conflict, DomainError
from base.models import ApiKey, ApiKeyScope, AuditEvent, Membership, Project, Role
from base.setting_checks import (
    EDITABLE_SETTINGS,
    SECRET_SETTINGS,
    SETTING_CHECKS,
)

KEY_PREFIX = "mc_"
VALID_SCOPES = {choice.value for choice in ApiKeyScope}


def audit_record(
    *,
    action: str,
    project: Project | None = None,
    actor: Any = None,
    actor_label: str = "",
    obj: Any = None,
    before: dict | None = None,
    after: dict | None = None,
    message: str = "",
) -> AuditEvent:
    """Append one audit event. Call it inside the transaction that made the change."""
    if actor is not None and not getattr(actor, "is_authenticated", False):
        actor = None
    if not actor_label:
        actor_label = actor.get_username() if actor is not None else "system"
    return AuditEvent.objects.create(
        project=project,
        actor=actor,
        actor_label=actor_label[:200],
        action=action,
        object_type=obj._meta.label_lower if obj is not None else "",
        object_id=str(obj.pk) if obj is not None else "",
        object_repr=str(obj)[:300] if obj is not None else "",
        before=before,
        after=after,
        message=message,
    )


@transaction.atomic
def project_row_create(*, name: str, slug: str = "", actor: Any = None) -> Project:
    """The project's own row and its audit event, nothing else: a project also starts with a
    policy version, which the skills app owns, so make one with
    ``metaclaw_site.projects.project_create``."""
    slug = slugify(slug or name)[:64]
    if not slug:
        raise DomainError("A project needs a name.", field="name")
    if Project.objects.filter(slug=slug).exists():
        raise Conflict(f"A project with the slug '{slug}' exists already.", field="slug")
    project = Project.objects.create(name=name, slug=slug)
    audit_record(action="project.create", project=project, actor=actor, obj=project)
    return project


@transaction.atomic
def membership_set(*, project: Project, user: Any, role: str, actor: Any = None) -> Membership:
    """Add ``user`` to ``project`` with ``role``, or change the role of an existing member."""
    if role not in Role.values:
        raise DomainError(f"Unknown role '{role}'.", field="role")
    if role != Role.ADMIN:
        # Admin rows first, always in this order, so concurrent role changes cannot deadlock.
        _ensure_another_admin(project=project, user=user)
    membership, created = Membership.objects.select_for_update().get_or_create(
        project=project, user=user, defaults={"role": role}
    )
    before = None if created else {"role": membership.role}
    if not created and membership.role != role:
        membership.role = role
        membership.save(update_fields=["role"])
    audit_record(
        action="membership.set",
        project=project,
        actor=actor,
        obj=membership,
        before=before,
        after={"role": role, "user": user.get_username()},
    )
    return membership


@transaction.atomic
def membership_remove(*, project: Project, user: Any, actor: Any = None) -> None:
    _ensure_another_admin(project=project, user=user)
    deleted, _ = Membership.objects.filter(project=project, user=user).delete()
    if deleted:
        audit_record(
            action="membership.remove",
            project=project,
            actor=actor,
            before={"user": user.get_username()},
        )


def _ensure_another_admin(*, project: Project, user: Any) -> None:
    """Refuse to demote or remove the project's last admin. Locks the admin rows, so two
    admins demoting each other at once cannot both succeed."""
    admins = list(
        Membership.objects.select_for_update()
        .filter(project=project, role=Role.ADMIN)
        .values_list("user_id", flat=True)
    )
    if user.pk in admins and len(admins) == 1:
        raise Conflict("A project needs at least one admin; make someone else admin first.")


def user_create(*, username: str, password: str, email: str = "", is_staff: bool = False) -> Any:
    user_model = get_user_model()
    user = user_model(username=username, email=email, is_staff=is_staff, is_superuser=is_staff)
    user.set_password(password)
    user.save()
    return user


@dataclass(frozen=True)
class IssuedKey:
    api_key: ApiKey
    secret: str  # the full key; shown once and never stored


def _hash_secret(secret: str) -> str:
    # Keys carry 190+ bits of randomness, so a fast hash is safe here (no need for a KDF).
    return hashlib.sha256(secret.encode()).hexdigest()


@transaction.atomic
def api_key_create(
    *, project: Project, name: str, scopes: list[str], actor: Any = None
) -> IssuedKey:
    """A new key; the person who makes it (``actor``, in the dashboard) is its owner, whom its
    decisions count as (``ApiKey.owner_id``). A key made by a command has no owner."""
    scopes = sorted(set(scopes))
    unknown = set(scopes) - VALID_SCOPES
    if not scopes or unknown:
        raise DomainError(
            f"Scopes must be a non-empty subset of {sorted(VALID_SCOPES)}.", field="scopes"
        )
    if not name.strip():
        raise DomainError("A key needs a name.", field="name")
    prefix = secrets.token_hex(4)
    secret = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey.objects.create(
        project=project,
        name=name.strip(),
        prefix=prefix,
        hashed_secret=_hash_secret(secret),
        scopes=scopes,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    audit_record(
        action="api_key.create",
        project=project,
        actor=actor,
        obj=api_key,
        after={"name": api_key.name, "prefix": prefix, "scopes": scopes},
    )
    return IssuedKey(api_key=api_key, secret=secret)


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, actor: Any = None) -> ApiKey:
    api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if api_key.revoked_at is not None:
        raise Conflict("This key is revoked already.")
    api_key.revoked_at = timezone.now()
    api_key.save(update_fields=["revoked_at"])
    api_key_cache_clear()
    audit_record(
        action="api_key.revoke",
        project=api_key.project,
        actor=actor,
        obj=api_key,
        before={"revoked": False},
        after={"revoked": True},
    )
    return api_key


# Recently authenticated keys, per process, by hash: saves a database round trip on the hot
# ingestion and runtime paths (one cache for both). A revocation is immediate in the revoking
# process and reaches the others within API_KEY_CACHE_SECONDS.
_key_cache: dict[str, tuple[float, ApiKey]] = {}
_key_cache_lock = threading.Lock()


def api_key_cache_clear() -> None:
    with _key_cache_lock:
        _key_cache.clear()


def _key_cache_ttl() -> float:
    return float(settings.METACLAW.get("API_KEY_CACHE_SECONDS", 5))


def api_key_cached(secret: str) -> ApiKey | None:
    """The key for ``secret`` if this process authenticated it recently; no database access
    (the async proxy asks this first, before hopping to a thread for the database)."""
    cached = _key_cache.get(_hash_secret(secret))
    if cached is not None and time.monotonic() - cached[0] < _key_cache_ttl():
        return cached[1]
    return None


def api_key_authenticate(secret: str) -> ApiKey | None:
    """The active key matching ``secret`` with its project loaded, or None.

    Also stamps ``last_used_at``, at most once a minute per key, with a conditional UPDATE so
    busy keys do not turn every request into a write."""
    if not secret.startswith(KEY_PREFIX):
        return None
    prefix, _, rest = secret[len(KEY_PREFIX) :].partition("_")
    if not prefix or not rest:
        return None
    cached = api_key_cached(secret)
    if cached is not None:
        return cached
    hashed = _hash_secret(secret)
    api_key = (
        ApiKey.objects.select_related("project")
        .filter(prefix=prefix, revoked_at__isnull=True)
        .first()
    )
    if api_key is None or not hmac.compare_digest(api_key.hashed_secret, hashed):
        return None
    now = timezone.now()
    if api_key.last_used_at is None or (now - api_key.last_used_at).total_seconds() > 60:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    if _key_cache_ttl() > 0:
        with _key_cache_lock:
            if len(_key_cache) > 10_000:
                _key_cache.clear()
            _key_cache[hashed] = (time.monotonic(), api_key)
    return api_key


# --- The project's upstream: where its proxy forwards (the slow loop's adapter server, offline) -


@transaction.atomic
def project_upstream_set(
    *, project: Project, base_url: str, actor: Any = None, actor_label: str = ""
) -> Project:
    """Point the project's proxy (``/v1/chat/completions``) at ``base_url``, an
    OpenAI-compatible endpoint such as ``serve_adapter``'s; ``""`` falls back to the site-wide
    upstream. Locks the project row so two commands cannot interleave their audit events."""
    permissions.require_role(actor, project, Role.ADMIN)
    base_url = base_url.strip().rstrip("/")
    if base_url:
        try:
            URLValidator(schemes=["http", "https"])(base_url)
        except ValidationError as exc:
            raise DomainError(
                f"'{base_url}' is not an http(s) URL.", field="upstream_base_url"
            ) from exc
    locked = Project.objects.select_for_update().get(pk=project.pk)
    before = locked.upstream_base_url
    if before == base_url:
        return locked
    locked.upstream_base_url = base_url
    locked.save(update_fields=["upstream_base_url"])
    audit_record(
        action="project.upstream.update",
        project=locked,
        actor=actor,
        actor_label=actor_label,
        obj=locked,
        before={"upstream_base_url": before},
        after={"upstream_base_url": base_url},
    )
    project.upstream_base_url = base_url
    return locked


# --- Project settings (the settings page) -----------------------------------------------------


def upstream_origin(url: str) -> str:
    """scheme://host:port of ``url``: where a key sent to it ends up."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}" if url else ""


def upstream_url_effective(project_url: str) -> str:
    """Where the proxy sends a project's requests (``skills.runtime.upstream.upstream_for``):
    its own base URL, else the site's."""
    return project_url or (settings.UPSTREAM["BASE_URL"] or "").rstrip("/")


def _secret_audit(old: str, new: str) -> tuple[str, str]:
    return ("set" if old else "not set"), ("not set" if not new else "changed" if old else "set")


@transaction.atomic
def project_settings_update(
    *, project: Project, changes: dict[str, Any], actor: Any, actor_label: str = ""
) -> Project:
    """Change the settings named in ``changes`` (a subset of ``EDITABLE_SETTINGS``; the others
    stay as they are) and record one audit event with each changed setting before and after;
    a secret appears there only as "set" / "not set" / "changed". ``upstream_api_key`` is the
    plaintext key ("" clears it) and is stored encrypted. Every value is checked first; a
    refusal (DomainError naming the field) changes nothing. Locks the project row.

    The stored upstream key is sent only to the origin it was given for: moving the base URL
    to another host while a key is stored needs the key typed again (or cleared), so an admin
    cannot redirect the write-only key to a server of their own and read it there. A base URL
    a person types goes through the outbound guard (``base.outbound``), as webhooks do."""
    permissions.require_role(actor, project, Role.ADMIN)
    unknown = sorted(set(changes) - set(EDITABLE_SETTINGS))
    if unknown:
        raise DomainError(f"Not a project setting: {', '.join(unknown)}.", field=unknown[0])
    values = {name: SETTING_CHECKS[name](value) for name, value in changes.items()}
    typed_url = values.get("upstream_base_url", "")
    if typed_url and typed_url != project.upstream_base_url and actor is not None:
        # Before the lock: this resolves the host name.
        refusal = outbound.url_refusal(typed_url)
        if refusal is not None:
            raise DomainError(refusal, field="upstream_base_url")
    locked = Project.objects.select_for_update().get(pk=project.pk)

    new_url = values.get("upstream_base_url", locked.upstream_base_url)
    given_for = upstream_url_effective(locked.upstream_base_url)
    sent_to = upstream_url_effective(new_url)
    if (
        locked.upstream_api_key
        and "upstream_api_key" not in values
        and upstream_origin(sent_to) != upstream_origin(given_for)
    ):
        raise DomainError(
            f"The stored key was given for {given_for} and is sent only there: type it again "
            f"to send it to {sent_to or 'the new URL'}, or clear it.",
            field="upstream_api_key",
        )

    old_key = selectors.project_upstream_api_key(locked)
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for name, value in values.items():
        if name in SECRET_SETTINGS:
            stored = locked.upstream_api_key
            if (not value and not stored) or (
                value and value == old_key and crypto.is_encrypted(stored)
            ):
                continue
            before[name], after[name] = _secret_audit(old_key, value)
            setattr(locked, name, crypto.encrypt(value))
            continue
        current = getattr(locked, name)
        if current == value:
            continue
        before[name], after[name] = current, value
        setattr(locked, name, value)
    if not after:
        return locked
    locked.save(update_fields=sorted(after))
    audit_record(
        action="project.settings.update",
        project=locked,
        actor=actor,
        actor_label=actor_label,
        obj=locked,
        before=before,
        after=after,
    )
    return locked
