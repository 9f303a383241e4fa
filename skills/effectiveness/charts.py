"""The effectiveness chart: incidents per 1,000 turns per day as an inline SVG (no JavaScript),
with a vertical mark at each activation. Built from numbers and dates we computed only."""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils.safestring import SafeString, mark_safe

from skills.effectiveness.services import DayPoint


def rate_chart(
    series: list[DayPoint], marks: list[datetime], *, width: int = 420, height: int = 90
) -> SafeString:
    if not series:
        return mark_safe("")
    first = series[0].day
    days = len(series)
    step = width / days
    peak = max((p.rate or 0.0) for p in series) or 1.0
    bars = []
    for i, point in enumerate(series):
        if point.rate is None:  # no traffic that day: nothing to show, not a zero
            continue
        h = max(1.0, point.rate / peak * (height - 12)) if point.rate else 1.0
        bars.append(
            f'<rect class="eff-bar" x="{i * step:.1f}" y="{height - h:.1f}" '
            f'width="{max(step - 1, 1):.1f}" height="{h:.1f}" fill="#5b6ee1">'
            f"<title>{point.day.isoformat()}: "
            f"{point.rate:g} per 1,000 turns ({point.incidents}/{point.turns})</title></rect>"
        )
    lines = []
    for mark in marks:
        offset = mark.astimezone(UTC) - datetime(first.year, first.month, first.day, tzinfo=UTC)
        x = offset.total_seconds() / 86400 * step
        if 0 <= x <= width:
            lines.append(
                f'<line class="eff-activation" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" '
                f'stroke="#c0392b" stroke-width="2" stroke-dasharray="4 2"><title>Went live '
                f"{mark.astimezone(UTC):%Y-%m-%d %H:%M} UTC</title></line>"
            )
    label = (
        f"Incidents per 1,000 turns per day from {first.isoformat()} over {days} days, "
        f"{len(lines)} activation{'s' if len(lines) != 1 else ''} marked"
    )
    return mark_safe(  # noqa: S308 - numbers and dates only, see the module docstring
        f'<svg class="eff-chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{label}">{"".join(bars)}{"".join(lines)}'
        "</svg>"
    )
