"""The skills relevant to a request, within a token budget, and the system-prompt section that
carries them (replaced, never stacked, when an agent sends a prompt it got from us)."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings

from skills.library.embeddings import get_embedder, top_k
from skills.runtime.policy import PolicySnapshot, SkillEntry

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
# The least relevance a skill needs to be injected, set from benchmarks/retrieval.py's
# labelled set (METACLAW["RETRIEVAL_MIN_SCORE"]): read when a request does not give its own.
DEFAULT_MIN_SCORE = float(settings.METACLAW["RETRIEVAL_MIN_SCORE"])
DEFAULT_TOKEN_BUDGET = 1500
MAX_QUERY_CHARS = 2000

SKILLS_BEGIN = "<!-- metaclaw:active-skills -->"
SKILLS_END = "<!-- /metaclaw:active-skills -->"
_SECTION_RE = re.compile(re.escape(SKILLS_BEGIN) + r".*?" + re.escape(SKILLS_END), re.S)


# --- Retrieval ----------------------------------------------------------------------------

_FENCED_METADATA = re.compile(
    r"^[^\n]*\((?:untrusted )?(?:metadata|context)\)[^\n]*:\s*\n```.*?```\s*", re.S | re.M | re.I
)
# The opening tag of a wrapper block; its closing tag is found with ``str.find`` (a lazy
# ``<tag>.*?</tag>`` regex is quadratic on input full of unclosed tags).
_WRAPPER_OPEN = re.compile(
    r"<(system[-_]reminder|environment[-_]details|env|metadata|context|system|"
    r"session[-_]info)\b[^<>]{0,500}>",
    re.I,
)
# Each message is cut to its last MAX_CLEAN_CHARS characters before cleaning, and at most
# MAX_QUERY_MESSAGES user messages are looked at: retrieval cost stays bounded per request.
MAX_CLEAN_CHARS = MAX_QUERY_CHARS * 4
MAX_QUERY_MESSAGES = 16
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
# ``[ \t]*`` rather than ``\s*`` after ``^``: with re.M, ``^\s*`` is quadratic on blank lines.
_BRACKET_PREFIX = re.compile(r"^[ \t]*\[[^\]\n]{1,120}\]\s*", re.M)
_HEADER_LINE = re.compile(
    r"^[ \t]*(?:current (?:date|time)|date|time|timestamp|now|session(?: id)?|user(?: id)?|"
    r"channel|sender|conversation(?: id)?|message id|timezone|locale|cwd|working directory)"
    r"\s*[:=][^\n]*$\n?",
    re.M | re.I,
)


def content_text(content: Any) -> str:
    """The text of an OpenAI message content (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict)
            and part.get("type") in ("text", "input_text")
            and isinstance(part.get("text"), str)
        )
    return ""


def clean_request_text(text: str) -> str:
    """Strip what agent frameworks wrap around a user's words (metadata blocks, reminders,
    timestamps, header lines), which would otherwise pull the same skills every turn."""
    text = text[-MAX_CLEAN_CHARS:]
    text = _FENCED_METADATA.sub("", text)
    text = _strip_wrapper_blocks(text)
    text = _SECTION_RE.sub("", text)
    text = _HEADER_LINE.sub("", text)
    text = _BRACKET_PREFIX.sub("", text)
    return text.strip()


def _strip_wrapper_blocks(text: str) -> str:
    """Remove ``<tag ...>...</tag>`` wrapper blocks (case-insensitive tag names), in time
    linear in the text: the next closing tag of each name is searched for at most once per
    position it can be at."""
    lower = text.translate(_ASCII_LOWER)  # same length as ``text``, unlike str.lower()
    next_close: dict[str, int] = {}  # tag name -> position of its next closing tag, or -1
    out: list[str] = []
    kept_from = 0
    pos = 0
    while True:
        match = _WRAPPER_OPEN.search(text, pos)
        if match is None:
            break
        name = match.group(1).translate(_ASCII_LOWER)
        closing = f"</{name}>"
        close = next_close.get(name)
        if close is None or (close != -1 and close < match.end()):
            close = lower.find(closing, match.end())
            next_close[name] = close
        if close == -1:  # never closed from here on: not a block
            pos = match.start() + 1
            continue
        out.append(text[kept_from : match.start()])
        kept_from = pos = close + len(closing)
    out.append(text[kept_from:])
    return "".join(out)


def query_from_messages(messages: Iterable[Any]) -> str:
    """The retrieval query: the user's latest request, not the system prompt or boilerplate.

    A terse latest message ("yes, go ahead") takes the previous user message as context."""
    texts: list[str] = []
    looked_at = 0
    for message in reversed(list(messages)):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        looked_at += 1
        if looked_at > MAX_QUERY_MESSAGES:
            break
        text = clean_request_text(content_text(message.get("content"))[-MAX_CLEAN_CHARS:])
        if not text:
            continue
        texts.append(text)
        if len(texts) >= 2 or len(text.split()) >= 4:
            break
    return "\n".join(reversed(texts))[-MAX_QUERY_CHARS:]


@dataclass(frozen=True)
class Retrieved:
    skill: SkillEntry
    score: float
    rank: int = 1


def min_score_default() -> float:
    """The site's retrieval threshold (``METACLAW["RETRIEVAL_MIN_SCORE"]``)."""
    return float(settings.METACLAW.get("RETRIEVAL_MIN_SCORE", DEFAULT_MIN_SCORE))


def margin_default() -> float | None:
    """How far below the best skill the proxy still injects one
    (``METACLAW["RETRIEVAL_MARGIN"]``; None: no margin)."""
    value = settings.METACLAW.get("RETRIEVAL_MARGIN")
    return None if value is None else float(value)


def skills_retrieve(
    *,
    snapshot: PolicySnapshot,
    query: str,
    k: int = DEFAULT_TOP_K,
    min_score: float | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    margin: float | None = None,
) -> list[Retrieved]:
    """The ``k`` skills of the version most relevant to ``query`` scoring at least
    ``min_score`` (the site's default, ``min_score_default()``, when None), best first, whose
    texts fit ``token_budget`` together (a skill too long for what is left is skipped, a
    shorter one after it may still fit). Each carries its score and its 1-based rank.

    ``margin``: also leave out a skill scoring more than this below the best one (the proxy's
    rule, ``margin_default()``: a low threshold lets a skill reach its whole request family,
    the margin keeps the skills that merely pass it out of requests another skill fits far
    better). None: no margin (the pull API, where the agent sets ``min_score`` and ``k``)."""
    if not snapshot.skills or not query.strip() or k <= 0:
        return []
    if min_score is None:
        min_score = min_score_default()
    vector = _query_vector(query)
    ranked = top_k(vector, snapshot.matrix, min(len(snapshot.skills), k * 3))
    if ranked and margin is not None:
        min_score = max(min_score, ranked[0][1] - margin)
    chosen: list[Retrieved] = []
    left = token_budget
    for index, score in ranked:
        if score < min_score or len(chosen) >= k:
            break
        entry = snapshot.skills[index]
        if entry.tokens > left:
            continue
        chosen.append(Retrieved(entry, round(score, 4), len(chosen) + 1))
        left -= entry.tokens
    return chosen


@functools.lru_cache(maxsize=4096)
def _query_vector(query: str) -> np.ndarray:
    """An agent's tool loop sends the same latest request several times: embed it once."""
    vector = get_embedder().embed_one(query)
    vector.setflags(write=False)
    return vector


def skills_section(retrieved: Sequence[Retrieved], *, version: int) -> str:
    parts = [
        SKILLS_BEGIN,
        "## Active skills",
        f"Skills learned from earlier runs (MetaClaw policy v{version}). Apply the ones that fit "
        "this request; ignore the rest.",
    ]
    parts.extend(r.skill.injection_text() for r in retrieved)
    parts.append(SKILLS_END)
    return "\n\n".join(parts)


def messages_with_skills(messages: list[Any], section: str) -> list[Any]:
    """A copy of ``messages`` whose first system message ends with ``section`` (one is created
    at the top when there is none). Other messages are passed by reference, untouched; a
    section left from an earlier turn is replaced, not repeated."""
    out = list(messages)
    for index, message in enumerate(out):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
            continue
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            break  # content we cannot extend (a number, an object): add a message of our own
        if isinstance(content, list):
            kept = [
                p
                for p in content
                if not (isinstance(p, dict) and SKILLS_BEGIN in str(p.get("text", "")))
            ]
            new_content: Any = kept + [{"type": "text", "text": section}]
        else:
            base = _SECTION_RE.sub("", content or "").rstrip()
            new_content = f"{base}\n\n{section}" if base else section
        out[index] = {**message, "content": new_content}
        return out
    return [{"role": "system", "content": section}, *out]
