"""Redact secrets and personal data before text leaves the process (LLM prompts), is shown to
people who may not see it, or enters a training set. Replacements are visible markers,
``[REDACTED:kind]``, which the UI highlights, and every redaction says what was looked for
(``full_report``, ``redaction_summary``): a kind that was not looked for is never claimed.

Two layers:

- Our own patterns, always: secrets (API keys, tokens, private keys, passwords and values under
  secret-named keys), e-mail addresses and card numbers (Luhn-checked). With ``personal_data``
  also dates of birth (a date after "born", "DOB", "date of birth"...), street addresses (a house
  number and a street word, or a European "Via Roma 10") and the values of personal fields
  (``first_name``, ``dob``, ``phone``, ``address1``... in JSON or ``key=value`` text).
- A maintained PII detector (``base.pii``: Presidio on spaCy's small English model, and why
  that one), with ``personal_data`` only: names, phone numbers, and dates of birth the patterns
  missed. It is slow next to the patterns, so it never runs on the ingest path: only before
  synthesis and before evidence is shown to people who may not see personal data, and what it
  finds is cached by content (``Redactor.many``). Without it (not installed, or
  ``METACLAW["PII_DETECTION"] = False``) the patterns still run and every report says that
  names and phone numbers were not looked for.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from base.pii import BIRTH_WORD, PiiDetector, Span, get_detector

logger = logging.getLogger(__name__)

MARK = "[REDACTED:{kind}]"
MARK_RE = re.compile(r"\[REDACTED:([a-z_]+)\]")
# Bump when a pattern or the detector's configuration changes: cached results are keyed by it.
REDACTION_VERSION = 3

# What each kind is called on pages and in prompts: (one, many).
LABELS: dict[str, tuple[str, str]] = {
    "email": ("e-mail address", "e-mail addresses"),
    "api_key": ("API key", "API keys"),
    "token": ("token", "tokens"),
    "password": ("password", "passwords"),
    "private_key": ("private key", "private keys"),
    "secret_field": ("secret field", "secret fields"),
    "card_number": ("card number", "card numbers"),
    "person": ("name", "names"),
    "phone_number": ("phone number", "phone numbers"),
    "date_of_birth": ("date of birth", "dates of birth"),
    "street_address": ("street address", "street addresses"),
    "personal_field": ("personal field", "personal fields"),
}
# Looked for always (the old redactor's kinds: a report without them predates this module).
ALWAYS_KINDS = (
    "email", "api_key", "token", "password", "private_key", "secret_field", "card_number",
)  # fmt: skip
# Looked for with ``personal_data``, by our patterns; then by the detector when it is present.
PATTERN_PERSONAL_KINDS = ("date_of_birth", "street_address", "personal_field")
DETECTOR_KINDS = ("person", "phone_number")
PERSONAL_KINDS = DETECTOR_KINDS + PATTERN_PERSONAL_KINDS


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
        # An excerpt may cut the END line off: the rest of the text is then the key.
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
        ),
    ),
    ("api_key", re.compile(r"\b(?:sk|pk|rk)[-_](?:live|test|proj|ant)?[-_]?[A-Za-z0-9_\-]{16,}\b")),
    ("api_key", re.compile(r"\bmc_[0-9a-f]{8}_[A-Za-z0-9_\-]{20,}\b")),
    ("api_key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("api_key", re.compile(r"\b(?:ghp|gho|ghu|ghs|github_pat)_[A-Za-z0-9_]{20,}\b")),
    ("api_key", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b")),
    ("api_key", re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b")),
    ("token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b")),
    # These keep their first group (the label) and redact the value after it.
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

# --- Personal data: our own patterns -----------------------------------------------------------

_PERSONAL_KEY = (
    r"(?:(?:first|last|full|given|family|middle|customer|passenger|cardholder|holder)[_ -]?name"
    r"|surname|dob|date[_ -]?of[_ -]?birth|birth[_ -]?date|birthdate|birthday"
    r"|phone(?:[_ -]?number)?|mobile(?:[_ -]?number)?|telephone|home[_ -]?address"
    r"|street(?:[_ -]?address)?|address[_ -]?(?:line)?[_ -]?[12]|ssn|passport(?:[_ -]?number)?)"
)
_PERSONAL_KEYS = re.compile(rf"(?i)^{_PERSONAL_KEY}$")
_DATE = (
    r"(?:\d{4}-\d{2}-\d{2}|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}"
    r"|\d{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?,?\s+\d{4}"
    r"|(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4})"
)
_DOB = re.compile(rf"(?i)({BIRTH_WORD}[^\n\d]{{0,30}}?)({_DATE})")
_STREET_SUFFIX = (
    r"(?i:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl"
    r"|Terrace|Parkway|Pkwy|Square|Sq|Highway|Hwy|Close|Crescent)"
)
_STREET = re.compile(
    # 221B Baker Street, 1600 Pennsylvania Avenue NW, 500 W Madison St
    rf"\b\d{{1,5}}[A-Za-z]?\s+(?:(?:[NSEW]|[A-Z][\w'’.-]*)\s+){{0,3}}{_STREET_SUFFIX}\b\.?"
    r"(?:\s+(?:NW|NE|SW|SE)\b)?"
    # 8 rue de Rivoli; Via Roma 10; Hauptstraße 5
    # (case-sensitive: "sent 2 via email" is no address)
    r"|\b\d{1,5}[a-z]?,?\s+(?:[Rr]ue|[Aa]venue|[Bb]oulevard|[Cc]hemin|Via|[Cc]alle|[Rr]ua)\s+"
    r"(?:[\w'’-]+\s?){1,4}"
    r"|\b(?:[Rr]ue|Via|Calle|Rua|Avenida)\s+(?:[A-Z][\w'’-]*\s){1,3}\d{1,5}[a-z]?\b"
    r"|\b[A-ZÄÖÜ][\wäöüß-]+(?:straße|strasse|weg|gasse|platz|allee)\s+\d{1,5}[a-z]?\b"
)
_PERSONAL_VALUE = re.compile(
    rf"(?i)([\"']?\b{_PERSONAL_KEY}[\"']?\s*[:=]\s*[\"']?)([^\"'\n,;{{}}\[\]]{{1,80}})"
)


def _apply(text: str, spans: Iterable[Span], counts: Counter) -> str:
    """``text`` with each span replaced by its marker; overlapping spans keep the first."""
    out: list[str] = []
    position = 0
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if span.start < position:
            continue
        out.append(text[position : span.start])
        out.append(MARK.format(kind=span.kind))
        counts[span.kind] += 1
        position = span.end
    out.append(text[position:])
    return "".join(out)


# --- The redactor ------------------------------------------------------------------------------


@dataclass
class Redactor:
    """Redacts text and JSON, counting what it masked by kind.

    ``personal_data``: also look for personal data (our patterns, and the detector when it is
    present). Off, only secrets, e-mail addresses and card numbers are looked for: cheap enough
    for a whole training set, and ``looked_for`` says so."""

    personal_data: bool = False
    counts: Counter = field(default_factory=Counter)
    detector: PiiDetector | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.personal_data:
            self.detector = get_detector()

    @property
    def looked_for(self) -> tuple[str, ...]:
        if not self.personal_data:
            return ALWAYS_KINDS
        if self.detector is None:
            return ALWAYS_KINDS + PATTERN_PERSONAL_KINDS
        return ALWAYS_KINDS + PERSONAL_KINDS

    def text(self, value: str) -> str:
        if not value:
            return value
        return self.many([value])[0]

    def many(self, values: list[str]) -> list[str]:
        """Each of ``values`` redacted. The detector's results are cached by content (shared
        by every process), so evidence shown again, or the same policy in many incidents,
        is analysed once."""
        patterned = [self._patterns(v) if v else v for v in values]
        if self.detector is None:
            return patterned
        keys = [_cache_key(self.detector.name, v) if v.strip() else "" for v in patterned]
        cached = _cache_get_many([k for k in keys if k])
        out = list(patterned)
        todo = [i for i, k in enumerate(keys) if k and k not in cached]
        for i, k in enumerate(keys):
            if k in cached:
                out[i], counts = cached[k]
                self.counts.update(counts)
        if todo:
            found = self.detector.find([patterned[i] for i in todo])
            fresh: dict[str, tuple[str, dict[str, int]]] = {}
            for i, spans in zip(todo, found, strict=True):
                counts: Counter = Counter()
                out[i] = _apply(patterned[i], spans, counts)
                self.counts.update(counts)
                fresh[keys[i]] = (out[i], dict(counts))
            _cache_set_many(fresh)
        return out

    def _patterns(self, value: str) -> str:
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

        value = _CARD.sub(card, value)
        if not self.personal_data:
            return value
        for kind, pattern in (("date_of_birth", _DOB), ("personal_field", _PERSONAL_VALUE)):
            mark = MARK.format(kind=kind)
            value, n = pattern.subn(lambda m, mark=mark: m.group(1) + mark, value)
            self.counts[kind] += n
        value, n = _STREET.subn(MARK.format(kind="street_address"), value)
        self.counts["street_address"] += n
        return value

    def json(self, value: Any, key: str = "") -> Any:
        """Redact strings anywhere in a JSON value; values under secret-looking keys entirely
        (and, with ``personal_data``, under personal ones: ``first_name``, ``dob``...)."""
        if isinstance(value, str):
            if key and value and _SECRET_KEYS.match(key):
                self.counts["secret_field"] += 1
                return MARK.format(kind="secret_field")
            if key and value and self.personal_data and _PERSONAL_KEYS.match(key):
                self.counts["personal_field"] += 1
                return MARK.format(kind="personal_field")
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.json(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        return value

    def excerpt(self, value: str, limit: int) -> str:
        """At most ``limit`` characters of ``value``, redacted; only a window a little longer
        than the excerpt is analysed (``head``)."""
        value = (value or "").strip()
        if len(value) <= limit:
            return self.text(value)
        return _clip(self.text(head(value, limit + 400)), limit)

    def report(self) -> list[dict[str, Any]]:
        """What was masked: ``[{"kind": "email", "count": 2}, ...]``, most frequent first."""
        return [{"kind": k, "count": n} for k, n in self.counts.most_common() if n]

    def report_for(self, text: str) -> list[dict[str, Any]]:
        """``full_report`` of what ``text`` shows: its markers counted. For a text assembled
        from excerpts, some of them redacted and then left out for space."""
        shown = Counter(MARK_RE.findall(text))
        masked = [{"kind": k, "count": n} for k, n in shown.most_common()]
        return masked + [{"kind": k, "count": 0} for k in self.looked_for if k not in shown]

    def full_report(self) -> list[dict[str, Any]]:
        """``report`` and every other kind that was looked for, with count 0: what a page or a
        prompt needs to say truthfully what was and was not looked for."""
        masked = self.report()
        seen = {item["kind"] for item in masked}
        return masked + [{"kind": k, "count": 0} for k in self.looked_for if k not in seen]


def head(value: str, limit: int) -> str:
    """About the first ``limit`` characters of ``value``, to redact instead of all of it. The
    word cut by the end is dropped: half a secret no longer matches its pattern."""
    if len(value) <= limit:
        return value
    window = value[:limit]
    cut = max(window.rfind(" "), window.rfind("\n"))
    return window[:cut] if cut > limit // 2 else window


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space > limit * 3 // 4:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _cache_key(detector: str, text: str) -> str:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
    return f"redact:{REDACTION_VERSION}:{detector}:{digest}"


CACHE_SECONDS = 7 * 24 * 3600


def _cache_get_many(keys: list[str]) -> dict[str, Any]:
    if not keys:
        return {}
    from django.core.cache import cache

    try:
        return cache.get_many(keys)
    except Exception:  # noqa: BLE001 - a cache outage costs time, not redaction
        logger.warning("The redaction cache is unavailable.", exc_info=True)
        return {}


def _cache_set_many(values: dict[str, Any]) -> None:
    if not values:
        return
    from django.core.cache import cache

    try:
        cache.set_many(values, CACHE_SECONDS)
    except Exception:  # noqa: BLE001
        logger.warning("The redaction cache is unavailable.", exc_info=True)


def redact_text(value: str, *, personal_data: bool = False) -> tuple[str, list[dict[str, Any]]]:
    """One text redacted, and what was masked in it."""
    redactor = Redactor(personal_data=personal_data)
    return redactor.text(value), redactor.report()


# --- What a report says -------------------------------------------------------------------------


def _label(kind: str, count: int = 2) -> str:
    one, many = LABELS.get(kind, (kind.replace("_", " "), kind.replace("_", " ") + "s"))
    return one if count == 1 else many


@dataclass(frozen=True)
class RedactionSummary:
    masked: list[tuple[int, str]]  # (count, label), most first
    looked_for: list[str]
    not_looked_for: list[str]
    masked_kinds: list[tuple[str, int]] = field(default_factory=list)  # (kind, count)

    @property
    def text(self) -> str:
        """``Masked: 2 names, 1 e-mail address. Looked for: ... Not looked for: ...``"""
        masked = ", ".join(f"{n} {label}" for n, label in self.masked) or "nothing"
        parts = [f"Masked: {masked}.", f"Looked for: {', '.join(self.looked_for)}."]
        if self.not_looked_for:
            parts.append(f"Not looked for: {', '.join(self.not_looked_for)}.")
        return " ".join(parts)


def redaction_summary(report: list[dict[str, Any]]) -> RedactionSummary:
    """What a stored report (``full_report``) says. A report from before this module names only
    what was masked, by a redactor that looked for ``ALWAYS_KINDS`` alone."""
    counts = {str(item["kind"]): int(item.get("count", 0)) for item in report or []}
    full = all(kind in counts for kind in ALWAYS_KINDS)
    looked = [k for k in counts] if full else list(ALWAYS_KINDS)
    looked += [k for k in counts if k not in looked]
    order = list(LABELS)
    looked.sort(key=lambda k: order.index(k) if k in order else len(order))
    rank = {k: i for i, k in enumerate(order)}
    masked = sorted(
        ((n, k) for k, n in counts.items() if n), key=lambda item: (-item[0], rank.get(item[1], 99))
    )
    return RedactionSummary(
        masked=[(n, _label(k, n)) for n, k in masked],
        masked_kinds=[(k, n) for n, k in masked],
        looked_for=[_label(k) for k in looked],
        not_looked_for=[_label(k) for k in PERSONAL_KINDS if k not in looked],
    )
