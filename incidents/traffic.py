"""Traffic that agents count themselves: the service that records a report, and the reads that
effectiveness adds to the recorded turns. One small capability, so its write and its reads sit
together (the table is ``traffic_models``).

Effectiveness measures incidents per 1,000 turns. The proxy records every turn; an agent that
does not use it reports its turns (``POST /api/v1/trajectories/batch``) or, here, only how many
it served in a window. A report is spread evenly over its window, so a window that straddles a
release counts on both sides in proportion. An agent should report its traffic one way only:
turns that were recorded and also counted would be counted twice."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from base.errors import Conflict, DomainError
from base.models import Project
from base.querysets import narrowed
from incidents.traffic_models import TrafficReport

# A report covers at most this long: the daily figures and the before/after windows spread it
# evenly, which says little about a longer span.
MAX_WINDOW = timedelta(days=1)
# Clocks differ: a window may end this far in the future.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class TrafficRecorded:
    report: TrafficReport
    duplicate: bool


def _check_window(window_start: datetime, window_end: datetime, now: datetime) -> None:
    if window_end <= window_start:
        raise DomainError("window_end must be after window_start.", field="window_end")
    if window_end - window_start > MAX_WINDOW:
        raise DomainError(
            "A report covers at most 24 hours; send one report per day or shorter window.",
            field="window_end",
        )
    if window_end > now + CLOCK_SKEW:
        raise DomainError("window_end lies in the future.", field="window_end")


def traffic_report_record(
    *,
    project: Project,
    agent: str,
    turns: int,
    window_start: datetime,
    window_end: datetime,
    client_id: str | None = None,
    policy_version: int | None = None,
    api_key_id: int | None = None,
) -> TrafficRecorded:
    """Store a count of turns. Idempotent by ``client_id``: a retry returns the stored report
    (``duplicate``) and counts nothing again; the same id with other figures is a 409."""
    _check_window(window_start, window_end, timezone.now())
    figures = {
        "agent_name": agent,
        "turns": turns,
        "window_start": window_start,
        "window_end": window_end,
        "policy_version": policy_version,
    }
    with transaction.atomic():
        if client_id is None:
            report = TrafficReport.objects.create(project=project, api_key_id=api_key_id, **figures)
            return TrafficRecorded(report, duplicate=False)
        # get_or_create retries the read when a concurrent retry inserted the same id first.
        report, created = TrafficReport.objects.get_or_create(
            project=project,
            client_id=client_id,
            defaults={**figures, "api_key_id": api_key_id},
        )
    if not created and any(getattr(report, name) != value for name, value in figures.items()):
        raise Conflict(
            f"A report with id '{client_id}' was stored with other figures; a new count needs a "
            "new id.",
            field="id",
        )
    return TrafficRecorded(report, duplicate=not created)


# --- Reads ------------------------------------------------------------------------------------


def traffic_reports_for_project(
    project: Project,
    *,
    agent: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[TrafficReport]:
    """The project's reports whose window overlaps [since, until)."""
    return narrowed(
        TrafficReport.objects.filter(project=project),
        agent_name=agent,
        window_end__gt=since,
        window_start__lt=until,
    )


def _overlapping(project: Project, start: datetime, end: datetime) -> list[tuple]:
    # A window is at most MAX_WINDOW long: the start bound keeps the index usable.
    return list(
        TrafficReport.objects.filter(
            project=project,
            window_start__lt=end,
            window_start__gt=start - MAX_WINDOW,
            window_end__gt=start,
        ).values_list("turns", "window_start", "window_end")
    )


def _share(turns: int, window_start: datetime, window_end: datetime, lo: datetime, hi: datetime):
    overlap = (min(window_end, hi) - max(window_start, lo)).total_seconds()
    return turns * max(0.0, overlap) / (window_end - window_start).total_seconds()


def reported_turns(project: Project, start: datetime, end: datetime) -> int:
    """The turns reported for [start, end), each report counted in proportion to the part of
    its window inside. One query."""
    return round(sum(_share(*row, start, end) for row in _overlapping(project, start, end)))


def reported_turns_by_day(project: Project, start: datetime, end: datetime) -> dict[date, int]:
    """The same per UTC day of [start, end). One query."""
    by_day: dict[date, float] = defaultdict(float)
    for turns, window_start, window_end in _overlapping(project, start, end):
        lo, hi = max(window_start, start), min(window_end, end)
        day = lo.astimezone(UTC).date()
        while True:
            day_start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
            day_end = day_start + timedelta(days=1)
            if day_start >= hi:
                break
            by_day[day] += _share(
                turns, window_start, window_end, max(lo, day_start), min(hi, day_end)
            )
            day += timedelta(days=1)
    return {day: round(n) for day, n in by_day.items()}
