from __future__ import annotations

from django import template
from django.utils.html import format_html, format_html_join

register = template.Library()


@register.simple_tag
def sparkline(series: list[int], width: int = 70, height: int = 20) -> str:
    """A tiny bar chart (inline SVG, no JavaScript) of daily counts, oldest first."""
    if not series:
        return ""
    peak = max(series) or 1
    bar = width / len(series)
    rows = []
    for i, n in enumerate(series):
        h = max(1.0, n / peak * height) if n else 1.0
        rows.append((f"{i * bar:.1f}", f"{height - h:.1f}", f"{bar - 1:.1f}", f"{h:.1f}", n))
    bars = format_html_join(
        "", '<rect x="{}" y="{}" width="{}" height="{}"><title>{}</title></rect>', rows
    )
    return format_html(
        '<svg class="spark" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        'aria-label="Incidents per day over the last {d} days: {label}">{bars}</svg>',
        w=width,
        h=height,
        d=len(series),
        label=", ".join(str(n) for n in series),
        bars=bars,
    )
