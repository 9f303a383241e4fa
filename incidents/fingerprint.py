"""Versioned fingerprints for grouping incidents, Sentry-style.

Version 1: agent + kind + error type + normalised error message + tool name. The normaliser
strips what varies between occurrences of the same failure (numbers, ids, paths, URLs, e-mail
addresses, quoted values) so that "file '/tmp/a1.csv' not found (id 4411)" and
"file '/data/b.csv' not found (id 12)" group together. Bump ``FINGERPRINT_VERSION`` whenever the
rules change: existing groups keep their fingerprints and new incidents go to new groups.
"""

from __future__ import annotations

import hashlib
import re

FINGERPRINT_VERSION = 1

_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "<email>"),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I), "<url>"),
    (re.compile(r"\"(?:[^\"\\]|\\.){0,300}\"|'(?:[^'\\]|\\.){0,300}'|`[^`]{0,300}`"), "<value>"),
    (
        re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I),
        "<uuid>",
    ),
    (re.compile(r"(?:[A-Za-z]:\\|\.{0,2}/)(?:[\w.-]+[/\\])*[\w.-]+"), "<path>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b", re.I), "<hex>"),
    (re.compile(r"\b\d+(?:[.:,]\d+)*\b"), "<n>"),
    (re.compile(r"\s+"), " "),
]


def normalize_message(message: str) -> str:
    text = message[:2000]
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip()[:500]


def fingerprint(
    *, agent: str, kind: str, error_type: str, message: str, tool: str
) -> tuple[str, str]:
    """``(fingerprint, normalised message)`` for one incident."""
    normalized = normalize_message(message)
    material = "\x1f".join(
        [
            f"v{FINGERPRINT_VERSION}",
            agent.strip(),
            kind,
            error_type.strip(),
            normalized,
            tool.strip(),
        ]
    )
    return hashlib.sha1(material.encode("utf-8")).hexdigest(), normalized


def tool_from_messages(messages: list[dict]) -> str:
    """The tool the agent called last before failing: the last assistant tool call's name."""
    for message in reversed(messages):
        if not isinstance(message, dict):
            continue
        for call in reversed(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                return function["name"]
        if message.get("role") == "tool" and isinstance(message.get("name"), str):
            return message["name"]
    return ""
