"""What each project setting on the settings page accepts: one check per setting, each
refusing a bad value with a ``DomainError`` naming the field (``base.services.
project_settings_update`` applies them; the page's form and the API share them)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator

from base.errors import DomainError

__all__ = [
    "EDITABLE_SETTINGS",
    "SECRET_SETTINGS",
    "SETTING_CHECKS",
    "upstream_api_key_clean",
    "upstream_base_url_clean",
]

# What the settings page edits, in its order. Integrations (Slack, webhook, e-mail) have their
# own page and service (skills.approvals.notifications.project_integrations_update).
EDITABLE_SETTINGS = (
    "name",
    "upstream_base_url",
    "upstream_api_key",
    "upstream_model_map",
    "group_merge_threshold",
    "incidental_tools",
    "require_second_approver",
    "approval_link_ttl_hours",
    "approval_links_require_login",
    "llm_daily_token_budget",
    "rate_limit_per_minute",
    "min_sources_for_synthesis",
    "risk_allowed_domains",
    "replay_gate_mode",
    "replay_gate_max_calls",
    "replay_gate_max_tokens",
)
# Write-only: stored encrypted (base.crypto), never shown, and never in the audit log.
SECRET_SETTINGS = frozenset({"upstream_api_key"})
_INT_MAX = 2_147_483_647  # PostgreSQL's integer


def _check_int(value: Any, field: str, *, low: int, high: int = _INT_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DomainError(f"Enter a whole number from {low:,} to {high:,}.", field=field)
    return value


def _check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise DomainError("Must be true or false.", field=field)
    return value


def _check_name(value: Any) -> str:
    name = str(value or "").strip()
    if not name:
        raise DomainError("A project needs a name.", field="name")
    if len(name) > 200:
        raise DomainError("The name is longer than 200 characters.", field="name")
    return name


def upstream_base_url_clean(value: Any) -> str:
    url = str(value or "").strip().rstrip("/")
    if not url:
        return ""
    if len(url) > 200:
        raise DomainError("The URL is longer than 200 characters.", field="upstream_base_url")
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError as exc:
        raise DomainError(
            f"'{url}' is not an http(s) URL, e.g. https://api.openai.com/v1.",
            field="upstream_base_url",
        ) from exc
    return url


def upstream_api_key_clean(value: Any) -> str:
    key = str(value or "").strip()
    if len(key) > 500:
        raise DomainError("The key is longer than 500 characters.", field="upstream_api_key")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise DomainError(
            "An API key has no spaces, line breaks or control characters.",
            field="upstream_api_key",
        )
    return key


def _check_model_map(value: Any) -> dict[str, str]:
    field = "upstream_model_map"
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise DomainError(
            'The model map is a JSON object of names, e.g. {"gpt-4o-mini": "my-deployment"}.',
            field=field,
        )
    if len(value) > 200:
        raise DomainError("The model map has more than 200 entries.", field=field)
    cleaned: dict[str, str] = {}
    for name, target in value.items():
        if not isinstance(target, str) or not str(name).strip() or not target.strip():
            raise DomainError(
                f"Map each model name to a model name: '{name}' maps to {json.dumps(target)}.",
                field=field,
            )
        if len(str(name)) > 200 or len(target) > 200:
            raise DomainError("Model names are at most 200 characters.", field=field)
        cleaned[str(name).strip()] = target.strip()
    return cleaned


def _check_threshold(value: Any) -> float:
    field = "group_merge_threshold"
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise DomainError("Enter a number from 0 to 1.", field=field)
    if not 0.0 <= float(value) <= 1.0:
        raise DomainError("Enter a number from 0 to 1 (0 = the site default).", field=field)
    return float(value)


_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def _check_risk_allowed_domains(value: Any) -> str:
    field = "risk_allowed_domains"
    domains: list[str] = []
    for line in str(value or "").splitlines():
        domain = line.strip().lower().removeprefix("*.").rstrip(".")
        if not domain or domain in domains:
            continue
        if not _DOMAIN.match(domain):
            raise DomainError(
                f"'{domain[:60]}' is not a domain name (one a line, e.g. docs.example.com).",
                field=field,
            )
        domains.append(domain)
    if len(domains) > 500:
        raise DomainError("List at most 500 domains.", field=field)
    return "\n".join(domains)


def _check_incidental_tools(value: Any) -> str:
    field = "incidental_tools"
    names: list[str] = []
    for line in str(value or "").splitlines():
        name = line.strip()
        if not name or name in names:
            continue
        if len(name) > 200 or any(ch.isspace() for ch in name):
            raise DomainError(
                f"'{name[:60]}' is not a tool name (one a line, no spaces).", field=field
            )
        names.append(name)
    if len(names) > 200:
        raise DomainError("List at most 200 tools.", field=field)
    return "\n".join(names)


def _check_rate_limit(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return _check_int(value, "rate_limit_per_minute", low=1)


def _check_gate_mode(value: Any) -> str:
    if value not in ("off", "advisory", "required"):
        raise DomainError("Choose off, advisory or required.", field="replay_gate_mode")
    return str(value)


SETTING_CHECKS: dict[str, Any] = {
    "name": _check_name,
    "upstream_base_url": upstream_base_url_clean,
    "upstream_api_key": upstream_api_key_clean,
    "upstream_model_map": _check_model_map,
    "group_merge_threshold": _check_threshold,
    "incidental_tools": _check_incidental_tools,
    "risk_allowed_domains": _check_risk_allowed_domains,
    "require_second_approver": lambda v: _check_bool(v, "require_second_approver"),
    "approval_link_ttl_hours": lambda v: _check_int(
        v, "approval_link_ttl_hours", low=1, high=24 * 30
    ),
    "approval_links_require_login": lambda v: _check_bool(v, "approval_links_require_login"),
    "llm_daily_token_budget": lambda v: _check_int(v, "llm_daily_token_budget", low=0),
    "rate_limit_per_minute": _check_rate_limit,
    "min_sources_for_synthesis": lambda v: _check_int(
        v, "min_sources_for_synthesis", low=1, high=1000
    ),
    "replay_gate_mode": lambda v: _check_gate_mode(v),
    "replay_gate_max_calls": lambda v: _check_int(v, "replay_gate_max_calls", low=2, high=10_000),
    "replay_gate_max_tokens": lambda v: _check_int(v, "replay_gate_max_tokens", low=1_000),
}
