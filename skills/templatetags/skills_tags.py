"""Template helpers for the skills pages: evidence with its redactions marked, word diffs."""

from __future__ import annotations

import json
import re
from typing import Any

from django import template
from django.utils.html import escape, linebreaks
from django.utils.safestring import SafeString, mark_safe

from base.redaction import MARK_RE, redact_text
from skills.versions import diff as diffs

register = template.Library()

_ERRORISH = re.compile(r"(?i)\b(error|exception|traceback|failed|invalid|denied|timed? ?out)\b")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts
        return "\n".join(
            str(part.get("text", f"[{part.get('type', 'part')}]")) if isinstance(part, dict)
            else str(part)
            for part in value
        )  # fmt: skip
    return json.dumps(value, ensure_ascii=False)


@register.filter
def evidence(value: Any) -> SafeString:
    """Text from an incident, redacted again for display (nothing raw reaches the page), with
    every ``[REDACTED:kind]`` marker highlighted."""
    redacted, _ = redact_text(_text(value))
    html = escape(redacted)
    html = MARK_RE.sub(
        lambda m: f'<span class="redacted" title="Redacted {m.group(1)}">{m.group(0)}</span>', html
    )
    return mark_safe(html.replace("\n", "<br>"))  # noqa: S308 - escaped above


@register.filter
def errorish(value: Any) -> bool:
    return bool(_ERRORISH.search(_text(value)))


@register.filter
def markdown_text(value: str) -> SafeString:
    """Instructions are Markdown; shown as escaped paragraphs (no HTML from the LLM)."""
    return mark_safe(linebreaks(value or "", autoescape=True))  # noqa: S308 - escaped by it


@register.simple_tag
def word_diff(old: str, new: str) -> SafeString:
    return diffs.word_diff_html(old or "", new or "")
