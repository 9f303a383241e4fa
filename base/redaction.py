"""Redact secrets and personal data before text leaves the process (LLM prompts) or enters a
training set. Replacements are visible markers, ``[REDACTED:kind]``, which the UI highlights.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MARK = "[REDACTED:{kind}]"
MARK_RE = re.compile(r"\[REDACTED:([a-z_]+)\]")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "private_key",
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]+?-----END [A-Z ]*PRIVATE KEY-----"),
    ),
    ("api_key", re.compile(r"\b(?:sk|pk|rk)[-_](?:live|test|proj|ant)?[-_]?[A-Za-z0-9_\-]{16,}\b")),
    ("api_key", re.compile(r"\bmc_[0-9a-f]{8}_[A-Za-z0-9_\-]{20,}\b")),
    ("api_key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("api_key", re.compile(r"\b(?:ghp|gho|ghu|ghs|github_pat)_[A-Za-z0-9_]{20,}\b")),
    ("api_key", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),
    ("api_key", re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b")),
    ("token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b")),
    # These two keep their first group (the label) and redact the value after it.
    ("token", re.compile(r"(?i)(\bbearer )[A-Za-z0-9._~+/\-]{16,}=*")),
    (
        "password",
        re.compile(
            r"(?i)(\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|token)[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',;}]{4,}"
        ),
    ),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
]
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_SECRET_KEYS = re.compile(
    r"(?i)^(?:password|passwd|pwd|secret|api[_-]?key|token|access[_-]?token|authorization|cookie)$"
)


@dataclass
class Redactor:
    counts: Counter = field(default_factory=Counter)

    def text(self, value: str) -> str:
        if not value:
            return value
        for kind, pattern in _PATTERNS:
            mark = MARK.format(kind=kind)
            replacement = (lambda m, mark=mark: m.group(1) + mark) if pattern.groups else mark
            value, n = pattern.subn(replacement, value)
            if n:
                self.counts[kind] += n

        def card(match: re.Match[str]) -> str:
            digits = re.sub(r"\D", "", match.group(0))
            if 13 <= len(digits) <= 19 and _luhn_ok(digits):
                self.counts["card_number"] += 1
                return MARK.format(kind="card_number")
            return match.group(0)

        return _CARD.sub(card, value)

    def json(self, value: Any, key: str = "") -> Any:
        """Redact strings anywhere in a JSON value; values under secret-looking keys entirely."""
        if isinstance(value, str):
            if key and _SECRET_KEYS.match(key) and value:
                self.counts["secret_field"] += 1
                return MARK.format(kind="secret_field")
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.json(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value

    def report(self) -> list[dict[str, Any]]:
        """``[{"kind": "email", "count": 2}, ...]``, most frequent first."""
        return [{"kind": k, "count": n} for k, n in self.counts.most_common()]


def redact_text(value: str) -> tuple[str, list[dict[str, Any]]]:
    redactor = Redactor()
    return redactor.text(value), redactor.report()
