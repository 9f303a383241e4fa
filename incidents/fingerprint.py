"""Versioned fingerprints for grouping incidents by failure mode, Sentry-style.

Version 2: agent + kind + error type + normalised message + the *decisive* tool: the last tool
the agent called that is not incidental. Agents often end a failed run with a hand-off to a
person, a calculator or a "think" step; keying on the last tool called (version 1) split one
failure mode into as many groups as there were such endings. The normaliser strips what varies
between occurrences of the same failure (numbers, ids and codes, paths, URLs, e-mail addresses,
quoted values) so that "file '/tmp/a1.csv' not found (id 4411)" and "file '/data/b.csv' not
found (id 12)" group together, and so do "reservation ZFA04Y ... JFK" and "reservation 8KD3LQ
... SFO". Wordings that differ beyond that are joined later, by meaning
(``skills.synthesis.similar``), and people merge and split groups by hand.

Bump ``FINGERPRINT_VERSION`` whenever the rules change: existing groups keep their fingerprints
and new incidents go to new groups (which the similarity merge then joins to the old ones).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
from collections.abc import Iterable

FINGERPRINT_VERSION = 2

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
    # Ids and codes with letters and digits: reservation ids, flight numbers, user handles.
    (re.compile(r"\b(?=[\w-]*[A-Za-z])(?=[\w-]*\d)[\w-]{3,}\b"), "<id>"),
    # Three-letter upper-case codes (airports, currencies) vary between occurrences.
    (re.compile(r"\b[A-Z]{3}\b"), "<code>"),
    (re.compile(r"\b\d+(?:[.:,]\d+)*\b"), "<n>"),
    (re.compile(r"\s+"), " "),
]

# Tools that hand a run over, compute or reflect: they end failed runs without deciding them.
BUILT_IN_INCIDENTAL_TOOLS = (
    "transfer_to_human*",
    "transfer_to_agent*",
    "handoff*",
    "hand_off*",
    "escalate*",
    "calculate",
    "calculator",
    "think",
    "reflect",
)


def normalize_message(message: str) -> str:
    text = message[:2000]
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip()[:500]


def fingerprint(
    *, agent: str, kind: str, error_type: str, message: str, tool: str
) -> tuple[str, str]:
    """``(fingerprint, normalised message)`` for one incident. ``tool`` is the decisive tool
    (``decisive_tool``) or the failing tool the agent named."""
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


@functools.lru_cache(maxsize=256)
def _incidental_matcher(extra: tuple[str, ...]) -> re.Pattern[str]:
    patterns = [*BUILT_IN_INCIDENTAL_TOOLS, *extra]
    return re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in patterns))


def incidental_patterns(text: str) -> tuple[str, ...]:
    """A project's own incidental tools (one name or wildcard a line) as a cache key."""
    return tuple(sorted({line.strip().lower() for line in text.splitlines() if line.strip()}))


def decisive_tool(messages: list[dict], incidental: Iterable[str] = ()) -> str:
    """The tool that decided the run: the last tool the assistant called that is not incidental
    (see ``BUILT_IN_INCIDENTAL_TOOLS``). When every call was incidental, the last one."""
    matcher = _incidental_matcher(tuple(incidental))
    last_incidental = ""
    for message in reversed(messages):
        if not isinstance(message, dict):
            continue
        names: list[str] = []
        for call in reversed(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                names.append(function["name"])
        if not names and message.get("role") == "tool" and isinstance(message.get("name"), str):
            # A tool result without the call that asked for it (trimmed conversations).
            names.append(message["name"])
        for name in names:
            if not matcher.fullmatch(name.lower()):
                return name
            last_incidental = last_incidental or name
    return last_incidental


def tool_from_messages(messages: list[dict]) -> str:
    """The decisive tool with the built-in incidental tools only (kept for callers that have no
    project at hand)."""
    return decisive_tool(messages)
