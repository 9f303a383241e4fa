"""Calendar arithmetic for idle windows: weekly windows in a time zone and iCalendar events.

Pure functions over plain data (no database), so the services and the tests share them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_LINE = re.compile(
    r"^\s*(?P<days>[a-z*,\-\s]+?)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$",
    re.IGNORECASE,
)


class WindowSyntaxError(ValueError):
    pass


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise WindowSyntaxError(f"Unknown time zone '{name}'.") from exc


def _parse_time(value: str) -> str:
    hours, minutes = (int(part) for part in value.split(":"))
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or (hours == 24 and minutes):
        raise WindowSyntaxError(f"'{value}' is not a time of day.")
    return f"{hours:02d}:{minutes:02d}"


def _parse_days(value: str) -> list[int]:
    value = value.strip().lower()
    if value in {"*", "daily", "every day", "all"}:
        return list(range(7))
    days: set[int] = set()
    for part in re.split(r"[,\s]+", value):
        if not part:
            continue
        if "-" in part:
            first, _, last = part.partition("-")
            a, b = _day(first), _day(last)
            span = range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)]
            days.update(span)
        else:
            days.add(_day(part))
    if not days:
        raise WindowSyntaxError(f"No days in '{value}'.")
    return sorted(days)


def _day(name: str) -> int:
    key = name.strip().lower()[:3]
    if key not in DAY_NAMES:
        raise WindowSyntaxError(f"'{name}' is not a day (mon … sun).")
    return DAY_NAMES.index(key)


def parse_weekly_windows(text: str) -> list[dict]:
    """``"mon-fri 01:00-05:00"`` a line → ``[{"days": [0..4], "start": "01:00", "end": "05:00"}]``.

    Days: names, ranges (``fri-mon`` wraps), lists, or ``daily``. An end at or before the start
    runs past midnight. Raises ``WindowSyntaxError`` naming the bad line."""
    windows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise WindowSyntaxError(
                f"Line {number}: write a window as 'mon-fri 01:00-05:00' (got '{line.strip()}')."
            )
        try:
            start, end = _parse_time(match["start"]), _parse_time(match["end"])
            days = _parse_days(match["days"])
        except WindowSyntaxError as exc:
            raise WindowSyntaxError(f"Line {number}: {exc}") from exc
        if start == end:
            raise WindowSyntaxError(f"Line {number}: the window is empty.")
        windows.append({"days": days, "start": start, "end": end})
    return windows


def format_days(days: list[int]) -> str:
    days = sorted(set(days))
    if days == list(range(7)):
        return "daily"
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    parts = [
        DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" for r in runs
    ]
    return ",".join(parts)


def format_window(window: dict) -> str:
    return f"{format_days(window['days'])} {window['start']}-{window['end']}"


def format_weekly_windows(windows: list[dict]) -> str:
    return "\n".join(format_window(w) for w in windows)


def _clock(value: str) -> time:
    hours, minutes = (int(p) for p in value.split(":"))
    return time.max if hours == 24 else time(hours, minutes)


@dataclass(frozen=True)
class Interval:
    start: datetime
    end: datetime
    label: str


def weekly_intervals(windows: list[dict], tz: ZoneInfo, around: datetime) -> list[Interval]:
    """Concrete openings of the weekly windows from a day before ``around`` to 8 days after."""
    local_day = around.astimezone(tz).date()
    out = []
    for offset in range(-1, 9):
        day = local_day + timedelta(days=offset)
        for window in windows:
            if day.weekday() not in window["days"]:
                continue
            start = datetime.combine(day, _clock(window["start"]), tzinfo=tz)
            end_day = day if window["end"] > window["start"] else day + timedelta(days=1)
            end = datetime.combine(end_day, _clock(window["end"]), tzinfo=tz)
            out.append(Interval(start, end, format_window(window)))
    return out


def _as_datetime(value: date | datetime, tz: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=tz)
    return datetime.combine(value, time.min, tzinfo=tz)


def calendar_intervals(ical_text: str, tz: ZoneInfo, around: datetime) -> list[Interval]:
    """Events of an iCalendar text (recurring ones expanded) overlapping the 15 days around
    ``around``. All-day events span their whole days in ``tz``. Raises ``WindowSyntaxError``
    for a text that is not iCalendar."""
    if not ical_text.strip():
        return []
    import icalendar
    from dateutil.rrule import rrulestr

    try:
        calendar = icalendar.Calendar.from_ical(ical_text)
    except ValueError as exc:
        raise WindowSyntaxError(f"Not an iCalendar file: {exc}") from exc
    lower, upper = around - timedelta(days=1), around + timedelta(days=14)
    out = []
    for event in calendar.walk("VEVENT"):
        if event.get("DTSTART") is None:
            continue
        start = _as_datetime(event.get("DTSTART").dt, tz)
        if event.get("DTEND") is not None:
            end = _as_datetime(event.get("DTEND").dt, tz)
        elif event.get("DURATION") is not None:
            end = start + event.get("DURATION").dt
        else:
            end = start + timedelta(days=1)
        length = end - start
        label = str(event.get("SUMMARY") or "calendar event")
        starts = [start]
        if event.get("RRULE") is not None:
            rule = rrulestr(event.get("RRULE").to_ical().decode(), dtstart=start)
            starts = rule.between(lower - length, upper, inc=True)
        for s in starts:
            if s + length > lower and s < upper:
                out.append(Interval(s, s + length, label))
    return out


def open_interval(intervals: list[Interval], now: datetime) -> Interval | None:
    """The interval containing ``now`` that stays open longest, or None."""
    current = [i for i in intervals if i.start <= now < i.end]
    return max(current, key=lambda i: i.end) if current else None


def next_opening(intervals: list[Interval], now: datetime) -> Interval | None:
    upcoming = [i for i in intervals if i.start > now]
    return min(upcoming, key=lambda i: i.start) if upcoming else None
