"""The parts of an agent's system prompt that a failure touches.

Agents' system prompts are policies of several kilobytes; the first few hundred characters are
a preamble that rarely says what the failure broke. The prompt is split into passages (a list
item, a paragraph, a long paragraph's sentences in chunks), each under its heading; the passages
most similar to the failure (the embedder of ``skills.library.embeddings``) are kept, in their
order, within a token budget."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from skills.library.embeddings import get_embedder

# A passage longer than this (estimated tokens) is cut into chunks of sentences.
PASSAGE_TOKENS = 160
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
_ITEM = re.compile(r"^\s{0,3}(?:[-*+]|\d{1,3}[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


@dataclass(frozen=True)
class Passage:
    order: int
    heading: str
    text: str


def split_passages(policy: str, count: Callable[[str], int]) -> list[Passage]:
    """``policy`` as passages in document order; ``count`` estimates a text's tokens."""
    passages: list[Passage] = []
    heading = ""
    block: list[str] = []

    def flush() -> None:
        text = " ".join(line.strip() for line in block).strip()
        block.clear()
        if not text:
            return
        for chunk in _chunks(text, count):
            passages.append(Passage(len(passages), heading, chunk))

    for line in policy.splitlines():
        match = _HEADING.match(line)
        if match:
            flush()
            heading = match.group(2)
        elif not line.strip():
            flush()
        elif _ITEM.match(line):
            flush()
            block.append(line)
        else:
            block.append(line)
    flush()
    return passages


def _chunks(text: str, count: Callable[[str], int]) -> list[str]:
    if count(text) <= PASSAGE_TOKENS:
        return [text]
    chunks: list[str] = []
    current = ""
    sentences: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentences += _words(sentence, count) if count(sentence) > PASSAGE_TOKENS else [sentence]
    for sentence in sentences:
        joined = f"{current} {sentence}".strip()
        if current and count(joined) > PASSAGE_TOKENS:
            chunks.append(current)
            current = sentence
        else:
            current = joined
    if current:
        chunks.append(current)
    return chunks


def _words(text: str, count: Callable[[str], int]) -> list[str]:
    """A sentence too long for a passage, cut between words."""
    pieces: list[str] = []
    current: list[str] = []
    for word in text.split():
        if current and count(" ".join([*current, word])) > PASSAGE_TOKENS:
            pieces.append(" ".join(current))
            current = []
        current.append(word[: PASSAGE_TOKENS * 3])
    if current:
        pieces.append(" ".join(current))
    return pieces


def relevant_passages(
    policies: list[str],
    failure: str,
    *,
    budget: int,
    count: Callable[[str], int],
    limit: int = 8,
) -> tuple[list[Passage], int]:
    """The passages of ``policies`` (distinct system prompts) most similar to ``failure``, best
    first, at most ``limit`` of them and ``budget`` tokens in all; and how many there were."""
    seen: set[str] = set()
    passages: list[Passage] = []
    for policy in policies:
        for passage in split_passages(policy, count):
            if passage.text not in seen:
                seen.add(passage.text)
                passages.append(Passage(len(passages), passage.heading, passage.text))
    if not passages or budget <= 0:
        return [], len(passages)
    embedder = get_embedder()
    vectors = embedder.embed([f"{p.heading}: {p.text}" if p.heading else p.text for p in passages])
    query = embedder.embed_one(failure)
    scores = vectors @ query
    ranked = sorted(range(len(passages)), key=lambda i: (-float(scores[i]), i))
    chosen: list[Passage] = []
    used = 0
    for index in ranked:
        passage = passages[index]
        cost = count(passage.text) + 4
        if used + cost > budget:
            continue
        chosen.append(passage)
        used += cost
        if len(chosen) >= limit:
            break
    return chosen, len(passages)


def render_passages(chosen: list[Passage], total: int) -> str:
    """The chosen passages in document order, under their headings, with gaps marked."""
    lines: list[str] = []
    heading = None
    previous = -1
    for passage in sorted(chosen, key=lambda p: p.order):
        if previous >= 0 and passage.order != previous + 1:
            lines.append("[…]")
        if passage.heading != heading and passage.heading:
            lines.append(f"### {passage.heading}")
        heading = passage.heading
        lines.append(passage.text)
        previous = passage.order
    if chosen and previous < total - 1:
        lines.append("[…]")
    return "\n".join(lines)
