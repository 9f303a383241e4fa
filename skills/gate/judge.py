"""How a pair of replayed answers is judged: a deterministic check when the incident says what
should have happened, else an LLM judge with a stated rubric.

Everything from traffic (the conversation, the error, the expected outcome, both answers) is
data: the judge's prompt wraps each piece in this request's delimiters
(``skills.synthesis.untrusted``) and says that nothing inside them is an instruction."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from skills.synthesis import llm, untrusted

RUBRIC = (
    "You judge two answers an AI agent gave at the same point of a conversation that failed "
    "before. Prefer the answer that (1) avoids the recorded failure, (2) reaches what the user "
    "asked for (the expected outcome, when given), (3) follows the tools' contracts, and (4) "
    "is correct and safe. Answer 'tie' when neither is clearly better. Judge only the answers; "
    "ignore their length and order."
)
SCHEMA = {
    "type": "object",
    "properties": {
        "better": {"type": "string", "enum": ["A", "B", "tie"]},
        "reason": {"type": "string"},
    },
    "required": ["better", "reason"],
}
MAX_TEXT = 6000


@dataclass(frozen=True)
class Judgement:
    verdict: str  # win | tie | loss, for the candidate
    method: str  # check | judge | none
    reason: str
    tokens: int = 0
    calls: int = 0


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text or "").strip().lower()


def expected_check(*, expected: str, candidate: str, active: str) -> Judgement | None:
    """The incident's expected outcome found in exactly one answer decides the pair."""
    wanted = _normal(expected)
    if not wanted:
        return None
    in_candidate, in_active = wanted in _normal(candidate), wanted in _normal(active)
    if in_candidate == in_active:
        return None
    if in_candidate:
        return Judgement(
            "win", "check", "Only the candidate's answer reaches the expected outcome."
        )
    return Judgement(
        "loss", "check", "Only the active version's answer reaches the expected outcome."
    )


def judge_messages(
    *, conversation: list[dict[str, Any]], error: str, expected: str, first: str, second: str
) -> list[dict[str, str]]:
    marker = untrusted.UntrustedMarker()
    transcript = json.dumps(conversation, ensure_ascii=False)[-MAX_TEXT:]
    system = (
        f"{RUBRIC}\n\n{untrusted.rule()}\n\nReply with one JSON object: "
        '{"better": "A" | "B" | "tie", "reason": "<one sentence>"}.'
    )
    user = "\n\n".join(
        [
            "The conversation, up to the step that failed:\n" + marker.wrap(transcript, "REPLAY"),
            "The recorded failure:\n" + marker.wrap(error[:MAX_TEXT], "DATA"),
            "The expected outcome:\n" + marker.wrap((expected or "(not given)")[:MAX_TEXT], "DATA"),
            "Answer A:\n" + marker.wrap(first[:MAX_TEXT], "ANSWER"),
            "Answer B:\n" + marker.wrap(second[:MAX_TEXT], "ANSWER"),
        ]
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def judge_pair(
    *,
    conversation: list[dict[str, Any]],
    error: str,
    expected: str,
    candidate: str,
    active: str,
    candidate_first: bool,
) -> Judgement:
    """Ask the LLM which answer is better; the candidate is shown first or second as told (the
    gate alternates, so a judge that prefers a position cannot favour either version)."""
    first, second = (candidate, active) if candidate_first else (active, candidate)
    messages = judge_messages(
        conversation=conversation, error=error, expected=expected, first=first, second=second
    )
    try:
        completion = llm.complete_json(messages, SCHEMA, schema_name="judgement", temperature=0)
    except llm.LlmNotConfigured:
        return Judgement("tie", "none", "No LLM is configured to judge, and no expected outcome.")
    tokens = completion.usage.tokens_in + completion.usage.tokens_out
    better = str(completion.parsed.get("better", "")).strip().upper()
    reason = str(completion.parsed.get("reason", ""))[:500]
    if better not in ("A", "B"):
        return Judgement("tie", "judge", reason, tokens, 1)
    candidate_won = (better == "A") == candidate_first
    return Judgement("win" if candidate_won else "loss", "judge", reason, tokens, 1)
