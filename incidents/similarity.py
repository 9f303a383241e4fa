"""Plain-text comparisons of failure descriptions: what two groups share, and whether one says
the opposite of the other.

Embeddings put "cancelled a reservation it should not have" next to "failed to cancel a
reservation it should have": the same words, opposite failures. ``contradiction`` finds a word
that one description negates and the other does not; the similarity merge and the related-group
links (``skills.synthesis.similar``) refuse such pairs, and the group page shows what two
related groups share (``shared_terms``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[a-z][a-z']+")
# Words (or starts of words) that turn the next few words into their opposite.
_NEGATORS = {
    "not", "no", "never", "without", "refused", "refuses", "refusing", "failed", "fails",
    "failing", "didn't", "doesn't", "don't", "wasn't", "isn't", "cannot", "can't", "won't",
    "neither", "nor", "denied", "declined", "instead",
}  # fmt: skip
_STOP = {
    "the", "and", "that", "this", "with", "from", "have", "been", "were", "they", "their",
    "which", "what", "when", "then", "than", "there", "into", "only", "also", "should",
    "would", "could", "agent", "user", "value", "although", "even", "though", "because",
    "after", "before", "every", "each", "other", "some", "more", "most", "first", "again",
    "code", "path", "email", "uuid",
}  # fmt: skip


def _stem(word: str) -> str:
    # Five letters join cancel / cancelled / cancelling / cancellation, change / changed.
    return word[:5]


@dataclass(frozen=True)
class Terms:
    positive: frozenset[str]
    negated: frozenset[str]

    @property
    def all(self) -> frozenset[str]:
        return self.positive | self.negated


def terms(text: str) -> Terms:
    """Content-word stems of a description, split by whether a negation governs them."""
    positive: set[str] = set()
    negated: set[str] = set()
    pending = False  # a negation waits for the content word it governs
    for word in _WORD.findall(text.lower()):
        if word in _NEGATORS or word.endswith("n't"):
            pending = True
            continue
        if len(word) < 4 or word in _STOP:
            continue
        (negated if pending else positive).add(_stem(word))
        pending = False
    return Terms(frozenset(positive), frozenset(negated))


def contradiction(first: str, second: str) -> str | None:
    """The stem one description only negates and the other only affirms, or None. A word
    that a description both negates and affirms decides nothing."""
    a, b = terms(first), terms(second)
    a_neg, a_pos = a.negated - a.positive, a.positive - a.negated
    b_neg, b_pos = b.negated - b.positive, b.positive - b.negated
    found = sorted((a_neg & b_pos) | (a_pos & b_neg))
    return found[0] if found else None


def shared_terms(first: str, second: str, limit: int = 6) -> list[str]:
    """Words of the first description whose stems the second uses too, in order."""
    common = terms(first).all & terms(second).all
    words: list[str] = []
    stems: set[str] = set()
    for word in _WORD.findall(first.lower()):
        stem = _stem(word)
        if stem in common and stem not in stems and len(word) >= 4 and word not in _STOP:
            stems.add(stem)
            words.append(word)
    return words[:limit]
