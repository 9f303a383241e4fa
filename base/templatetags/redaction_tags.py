"""What a stored redaction report says, for templates: ``report|redaction_summary``."""

from __future__ import annotations

from typing import Any

from django import template

from base.redaction import RedactionSummary
from base.redaction import redaction_summary as summarize

register = template.Library()


@register.filter
def redaction_summary(report: list[dict[str, Any]] | None) -> RedactionSummary:
    return summarize(report or [])
