"""A project's training policy (when it may train, on its own or not, and how) and whether it
is idle now: calendar windows, quiet traffic, or both."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from base import counters, permissions
from base.errors import DomainError
from base.models import Project, Role
from base.redaction import Redactor
from base.services import audit_record
from training.policy import windows
from training.policy.models import Backend, IdleMode, IdleWindowPolicy, Objective

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return timezone.now()


# --- Idle-window policy ---------------------------------------------------------------------


def idle_policy_get(project: Project) -> IdleWindowPolicy:
    """The project's policy; an unsaved default when it has none yet (nothing is written)."""
    policy = IdleWindowPolicy.objects.filter(project=project).first()
    return policy or IdleWindowPolicy(project=project)


POLICY_FIELDS = {
    "auto_train",
    "mode",
    "timezone",
    "weekly_windows",
    "ical_url",
    "ical_text",
    "traffic_threshold_rpm",
    "traffic_idle_minutes",
    "min_new_samples",
    "max_runs_per_day",
    "max_tokens_per_run",
    "max_sample_tokens",
    "eval_fraction",
    "stale_after_minutes",
    "backend",
    "backend_options",
    "base_model",
    "objective",
    "lora_rank",
    "learning_rate",
    "batch_size",
    "total_steps",
}


@transaction.atomic
def idle_policy_update(
    *, project: Project, actor: Any = None, actor_label: str = "", **changes: Any
) -> IdleWindowPolicy:
    """Create or change the project's idle-window policy. ``weekly_windows`` may be the text
    form (``"mon-fri 01:00-05:00"`` a line). Raises ``DomainError`` naming the bad field."""
    permissions.require_role(actor, project, Role.ADMIN)
    unknown = set(changes) - POLICY_FIELDS
    if unknown:
        raise DomainError(f"Unknown setting(s): {', '.join(sorted(unknown))}.", field=unknown.pop())
    policy, _ = IdleWindowPolicy.objects.get_or_create(project=project)
    policy = IdleWindowPolicy.objects.select_for_update().get(pk=policy.pk)
    if isinstance(changes.get("weekly_windows"), str):
        try:
            changes["weekly_windows"] = windows.parse_weekly_windows(changes["weekly_windows"])
        except windows.WindowSyntaxError as exc:
            raise DomainError(str(exc), field="weekly_windows") from exc
    _validate_policy_changes(changes)
    before = {name: getattr(policy, name) for name in changes}
    for name, value in changes.items():
        setattr(policy, name, value)
    policy.updated_at = timezone.now()
    policy.save(update_fields=[*changes, "updated_at"])
    audit_record(
        action="training.idle_policy.update",
        project=project,
        actor=actor,
        actor_label=actor_label,
        obj=policy,
        before=_jsonable(before),
        after=_jsonable({name: getattr(policy, name) for name in changes}),
    )
    return policy


def _jsonable(values: dict) -> dict:
    # Backend options may hold an API key: the audit log keeps the shape, not the secret.
    return Redactor().json(json.loads(json.dumps(values, default=str)))


def _validate_policy_changes(changes: dict) -> None:
    if "timezone" in changes:
        try:
            windows.zone(changes["timezone"])
        except windows.WindowSyntaxError as exc:
            raise DomainError(str(exc), field="timezone") from exc
    if "ical_text" in changes:
        try:
            windows.calendar_intervals(changes["ical_text"], windows.zone("UTC"), timezone.now())
        except (windows.WindowSyntaxError, ValueError) as exc:
            raise DomainError(f"The calendar could not be read: {exc}", field="ical_text") from exc
    choices = {"mode": IdleMode.values, "backend": Backend.values, "objective": Objective.values}
    for name, allowed in choices.items():
        if name in changes and changes[name] not in allowed:
            raise DomainError(f"'{changes[name]}' is not one of {allowed}.", field=name)
    for name in ("traffic_idle_minutes", "batch_size", "total_steps", "lora_rank"):
        if name in changes and not (1 <= int(changes[name]) <= 100_000):
            raise DomainError(f"{name} must be a positive number.", field=name)
    if "traffic_idle_minutes" in changes and int(changes["traffic_idle_minutes"]) > 120:
        raise DomainError(
            "Traffic is counted for at most 120 minutes.", field="traffic_idle_minutes"
        )
    if "eval_fraction" in changes and not (0.0 < float(changes["eval_fraction"]) < 0.9):
        raise DomainError("The held-out fraction must be between 0 and 0.9.", field="eval_fraction")
    if "learning_rate" in changes and not (0.0 < float(changes["learning_rate"]) <= 1.0):
        raise DomainError("The learning rate must be in (0, 1].", field="learning_rate")
    if "base_model" in changes and not str(changes["base_model"]).strip():
        raise DomainError("Name a base model.", field="base_model")
    if "backend_options" in changes and not isinstance(changes["backend_options"], dict):
        raise DomainError("Backend options must be a JSON object.", field="backend_options")


def idle_policy_calendar_refresh(
    *, policy: IdleWindowPolicy, fetch: Callable[[str], str] | None = None
) -> IdleWindowPolicy:
    """Fetch the iCalendar feed into ``ical_text`` (kept as it was when the fetch fails)."""
    if not policy.ical_url:
        return policy

    def default_fetch(url: str) -> str:
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - admin's URL
            return response.read(2_000_000).decode("utf-8", "replace")

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
