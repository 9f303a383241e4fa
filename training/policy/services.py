"""A project's training policy (when it may train, on its own or not, and how) and whether it
is idle now: calendar windows, quiet traffic, or both."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone

from base import counters, outbound, permissions
from base.errors import DomainError
from base.models import Project, Role
from base.redaction import MARK, Redactor
from base.services import audit_record
from training.policy import windows
from training.policy.models import Backend, IdleMode, IdleWindowPolicy, Objective
from training.policy.selectors import auto_training_on

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return timezone.now()


# --- Idle-window policy ---------------------------------------------------------------------


def idle_policy_get(project: Project) -> IdleWindowPolicy:
    """The project's policy; an unsaved default when it has none yet (nothing is written)."""
    policy = IdleWindowPolicy.objects.filter(project=project).first()
    return policy or IdleWindowPolicy(project=project)


@dataclass(frozen=True)
class Bounds:
    """The numbers a setting accepts (inclusive)."""

    kind: type
    low: float
    high: float
    # The low end itself is refused (a learning rate of 0 learns nothing, and any more may be
    # just what an experiment wants).
    open_low: bool = False


_INT_MAX = 2_147_483_647  # PositiveIntegerField's ceiling in PostgreSQL
# One table for every door: the dashboard form reads its limits from here, the service (which
# the form and the API both call) enforces them.
NUMBER_BOUNDS: dict[str, Bounds] = {
    "traffic_threshold_rpm": Bounds(int, 0, _INT_MAX),
    "traffic_idle_minutes": Bounds(int, 1, 120),  # Redis keeps 120 minutes of counts
    "min_new_samples": Bounds(int, 1, _INT_MAX),
    "max_runs_per_day": Bounds(int, 0, 10_000),
    "max_tokens_per_run": Bounds(int, 1, _INT_MAX),
    "max_sample_tokens": Bounds(int, 16, 1_000_000),
    "eval_fraction": Bounds(float, 0.01, 0.89),
    "stale_after_minutes": Bounds(int, 1, 10_080),
    "lora_rank": Bounds(int, 1, 256),
    "learning_rate": Bounds(float, 0.0, 1.0, open_low=True),
    "batch_size": Bounds(int, 1, 512),
    "total_steps": Bounds(int, 1, 100_000),
    "search_budget_minutes": Bounds(int, 0, 24 * 60),
}
# Setting one of these by hand pins it: the run trains once with them, no search (unless the
# same change sets a search budget).
PINNED_BY_HAND = ("learning_rate", "total_steps")
CHOICES: dict[str, list[str]] = {
    "mode": IdleMode.values,
    "backend": Backend.values,
    "objective": Objective.values,
}
TEXT_LIMITS = {"timezone": 64, "base_model": 300, "ical_url": 200}
POLICY_FIELDS = {
    "auto_train",
    "weekly_windows",
    "ical_text",
    "backend_options",
    *NUMBER_BOUNDS,
    *CHOICES,
    *TEXT_LIMITS,
}


@transaction.atomic
def idle_policy_update(
    *, project: Project, actor: Any = None, actor_label: str = "", **changes: Any
) -> IdleWindowPolicy:
    """Create or change the project's training policy: idle windows, backend, base model,
    hyperparameters and budgets. The dashboard's form and the API both call this, so both
    validate alike: ``weekly_windows`` may be the text form (``"mon-fri 01:00-05:00"`` a line),
    numbers must lie within ``NUMBER_BOUNDS``, and a secret in ``backend_options`` sent back
    masked (as ``idle_policy_settings`` shows it) keeps its stored value. Raises
    ``DomainError`` naming the first bad field; a refusal changes nothing. Only the settings
    that change are written and audited."""
    permissions.require_role(actor, project, Role.ADMIN)
    unknown = set(changes) - POLICY_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise DomainError(f"Unknown setting(s): {', '.join(sorted(unknown))}.", field=name)
    policy, _ = IdleWindowPolicy.objects.get_or_create(project=project)
    policy = IdleWindowPolicy.objects.select_for_update().get(pk=policy.pk)
    if changes.get("search_budget_minutes", 0) is None:
        del changes["search_budget_minutes"]  # the API's "left out": unchanged
    changes = _validated(changes, policy)
    changed = {name: value for name, value in changes.items() if getattr(policy, name) != value}
    if "search_budget_minutes" not in changes and any(n in changed for n in PINNED_BY_HAND):
        if policy.search_budget_minutes:
            changed["search_budget_minutes"] = 0
    if not changed:
        return policy
    before = {name: getattr(policy, name) for name in changed}
    for name, value in changed.items():
        setattr(policy, name, value)
    policy.updated_at = timezone.now()
    policy.save(update_fields=[*changed, "updated_at"])
    audit_record(
        action="training.idle_policy.update",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=policy,
        before=_jsonable(before),
        after=_jsonable(changed),
    )
    return policy


def idle_policy_settings(policy: IdleWindowPolicy) -> dict[str, Any]:
    """Every setting ``idle_policy_update`` takes, as the API shows it: the windows in their
    text form and secrets in the backend options masked (send them back as they are to keep
    them)."""
    values = {name: getattr(policy, name) for name in POLICY_FIELDS}
    values["auto_train"] = auto_training_on(policy)
    values["weekly_windows"] = windows.format_weekly_windows(policy.weekly_windows or [])
    values["backend_options"] = Redactor().json(dict(policy.backend_options or {}))
    return values


def _jsonable(values: dict) -> dict:
    # Backend options may hold an API key: the audit log keeps the shape, not the secret.
    return Redactor().json(json.loads(json.dumps(values, default=str)))


_SECRET_MASK = MARK.format(kind="secret_field")


def _validated(changes: dict[str, Any], policy: IdleWindowPolicy) -> dict[str, Any]:
    """``changes`` checked and converted to the stored types, or ``DomainError(field=...)``."""
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if name in NUMBER_BOUNDS:
            clean[name] = _number(name, value, NUMBER_BOUNDS[name])
        elif name in CHOICES:
            if value not in CHOICES[name]:
                raise DomainError(f"'{value}' is not one of {CHOICES[name]}.", field=name)
            clean[name] = str(value)
        elif name in TEXT_LIMITS:
            clean[name] = _text(name, value, TEXT_LIMITS[name])
        elif name == "auto_train":
            if not isinstance(value, bool):
                raise DomainError("auto_train must be true or false.", field=name)
            clean[name] = value
        elif name == "weekly_windows":
            clean[name] = _weekly_windows(value)
        elif name == "ical_text":
            clean[name] = _calendar_text(value)
        elif name == "backend_options":
            clean[name] = _backend_options(value, policy.backend_options or {})
    return clean


def _number(name: str, value: Any, bounds: Bounds) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DomainError(f"{name} must be a number.", field=name)
    try:
        number = bounds.kind(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DomainError(f"{name} must be a number.", field=name) from exc
    if bounds.kind is int and isinstance(value, float) and value != number:
        raise DomainError(f"{name} must be a whole number.", field=name)
    above_low = number > bounds.low if bounds.open_low else number >= bounds.low
    if not (above_low and number <= bounds.high):  # also refuses NaN
        if bounds.open_low:
            message = f"{name} must be above {bounds.low:g} and at most {bounds.high:g}."
        else:
            message = f"{name} must be between {bounds.low:g} and {bounds.high:g}."
        raise DomainError(message, field=name)
    return number


def _text(name: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise DomainError(f"{name} must be text.", field=name)
    value = value.strip()
    if len(value) > limit:
        raise DomainError(f"{name} is longer than {limit} characters.", field=name)
    if name == "timezone":
        try:
            windows.zone(value)
        except windows.WindowSyntaxError as exc:
            raise DomainError(str(exc), field=name) from exc
    elif name == "base_model" and not value:
        raise DomainError("Name a base model.", field=name)
    elif name == "ical_url" and value:
        try:
            URLValidator(schemes=["http", "https"])(value)
        except ValidationError as exc:
            raise DomainError("The iCalendar feed must be an http(s) URL.", field=name) from exc
        refusal = outbound.url_refusal(value)  # the fetch is checked again (base.outbound)
        if refusal is not None:
            raise DomainError(refusal, field=name)
    return value


def _weekly_windows(value: Any) -> list[dict]:
    try:
        if isinstance(value, str):
            return windows.parse_weekly_windows(value)
        if isinstance(value, list):
            # The stored form: accepted when it says what its text form says.
            return windows.parse_weekly_windows(windows.format_weekly_windows(value))
    except windows.WindowSyntaxError as exc:
        raise DomainError(str(exc), field="weekly_windows") from exc
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise DomainError(
            'Write windows as text ("mon-fri 01:00-05:00" a line).', field="weekly_windows"
        ) from exc
    raise DomainError(
        'Write windows as text ("mon-fri 01:00-05:00" a line).', field="weekly_windows"
    )


def _calendar_text(value: Any) -> str:
    if not isinstance(value, str):
        raise DomainError("ical_text must be text.", field="ical_text")
    try:
        windows.calendar_intervals(value, windows.zone("UTC"), timezone.now())
    except (windows.WindowSyntaxError, ValueError) as exc:
        raise DomainError(f"The calendar could not be read: {exc}", field="ical_text") from exc
    return value


def _backend_options(value: Any, stored: dict) -> dict:
    if not isinstance(value, dict):
        raise DomainError("Backend options must be a JSON object.", field="backend_options")
    return {
        key: stored[key] if item == _SECRET_MASK and key in stored else item
        for key, item in value.items()
    }


def idle_policy_calendar_refresh(
    *, policy: IdleWindowPolicy, fetch: Callable[[str], str] | None = None
) -> IdleWindowPolicy:
    """Fetch the iCalendar feed into ``ical_text`` (kept as it was when the fetch fails)."""
    if not policy.ical_url:
        return policy

    def default_fetch(url: str) -> str:
        # Through the outbound guard: http(s) only, public addresses only, pinned when connecting.
        raw = outbound.get_bytes(
            url, max_bytes=2_000_000, timeout=5.0, headers={"Accept": "text/calendar"}
        )
        return raw.decode("utf-8", "replace")

    try:
        text = (fetch or default_fetch)(policy.ical_url)
        windows.calendar_intervals(text, windows.zone(policy.timezone), timezone.now())
        policy.ical_text, policy.ical_error = text, ""
    except Exception as exc:  # noqa: BLE001 - a bad feed is shown, not raised
        policy.ical_error = str(exc)[:300]
    policy.ical_fetched_at = timezone.now()
    policy.save(update_fields=["ical_text", "ical_error", "ical_fetched_at"])
    return policy


# --- Idle detection -------------------------------------------------------------------------


@dataclass(frozen=True)
class IdleStatus:
    idle: bool
    reasons: list[str]
    in_window: bool
    window_label: str = ""
    window_ends_at: datetime | None = None
    traffic_quiet: bool | None = None
    traffic: list[int] = field(default_factory=list)
    next_window_at: datetime | None = None
    next_window_label: str = ""


def project_idle_status(
    *, project: Project, now: datetime | None = None, policy: IdleWindowPolicy | None = None
) -> IdleStatus:
    """Whether the project may train at ``now`` (an injectable clock), why, and when the next
    calendar window opens. Reads the Redis traffic counters; writes nothing."""
    now = now or _now()
    policy = policy or idle_policy_get(project)
    tz = windows.zone(policy.timezone)
    reasons: list[str] = []

    intervals = windows.weekly_intervals(policy.weekly_windows or [], tz, now)
    try:
        intervals += windows.calendar_intervals(policy.ical_text, tz, now)
    except (windows.WindowSyntaxError, ValueError) as exc:
        reasons.append(f"The calendar feed could not be read ({exc}).")
    has_calendar = bool(intervals)
    current = windows.open_interval(intervals, now)
    upcoming = windows.next_opening(intervals, now)
    if current is not None:
        ends = current.end.astimezone(tz)
        reasons.append(f"Inside the quiet window “{current.label}” until {ends:%a %H:%M %Z}.")
    elif has_calendar:
        reasons.append("Outside every calendar window.")
    else:
        reasons.append("No calendar windows are configured.")

    minutes = max(1, policy.traffic_idle_minutes)
    traffic = counters.traffic_per_minute(
        project_id=project.pk, minutes=minutes + 1, now=now.timestamp()
    )
    peak = max(traffic) if traffic else 0
    quiet = peak < policy.traffic_threshold_rpm
    if quiet:
        reasons.append(
            f"Traffic stayed below {policy.traffic_threshold_rpm} requests/min for the last "
            f"{minutes} minutes (peak {peak})."
        )
    else:
        reasons.append(
            f"Traffic reached {peak} requests/min in the last {minutes} minutes "
            f"(quiet means below {policy.traffic_threshold_rpm})."
        )

    in_window = current is not None
    mode = policy.mode
    if mode == IdleMode.CALENDAR:
        is_idle = in_window
    elif mode == IdleMode.TRAFFIC:
        is_idle = quiet
    elif mode == IdleMode.BOTH:
        is_idle = in_window and quiet
    else:
        is_idle = in_window or quiet
    reasons.append(f"Rule: {IdleMode(mode).label.lower()}.")
    return IdleStatus(
        idle=is_idle,
        reasons=reasons,
        in_window=in_window,
        window_label=current.label if current else "",
        window_ends_at=current.end if current else None,
        traffic_quiet=quiet,
        traffic=traffic,
        next_window_at=upcoming.start if upcoming else None,
        next_window_label=upcoming.label if upcoming else "",
    )
