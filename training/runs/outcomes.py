"""Judging a candidate by what it does: answers on held-out conversations, generated with the
backend for the active version and for the candidate, checked against each conversation's
target, and pass rates compared with their intervals. Loss is a secondary figure.

A held-out sample's target, first that applies:

1. a deterministic check its trajectory or incident carries in ``metadata["check"]``:
   ``{"regex": ...}`` (searched in the answer), ``{"ends_with": ...}``, ``{"contains": ...}`` or
   ``{"equals": ...}`` (the last three compared after normalising case and spaces);
2. the incident's expected outcome: the normalised answer contains it;
3. a person's corrected answer: the normalised answer equals it.

Samples with none of these (an ordinary successful turn) are not judged. A candidate improves
when the lower end of the 95 % interval of the difference of pass rates (Newcombe's hybrid
score interval, from Wilson intervals) lies above zero: a gain the sample size supports, never
a gain in loss alone.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.backends.base import TrainConfig, TrainingBackend

Z95 = 1.959964
# Pattern and answer lengths a check runs on: a pattern from traffic must stay cheap to run.
MAX_PATTERN = 300
MAX_ANSWER = 4000
# Answers are cut this many tokens (estimated) past the target's length: enough to judge, and
# a base model that rambles costs no more than that.
ANSWER_SLACK_TOKENS = 16
MAX_ANSWER_TOKENS = 128


@dataclass(frozen=True)
class OutcomeCase:
    """One held-out conversation with a target to judge the answer against."""

    prompt: list[dict[str, Any]]
    reference: str
    check: dict[str, str] | None = None
    expected: str = ""

    @property
    def max_tokens(self) -> int:
        target = self.reference or self.expected or next(iter((self.check or {}).values()), "")
        return min(MAX_ANSWER_TOKENS, len(target) // 3 + ANSWER_SLACK_TOKENS)


def _normal(text: str) -> str:
    return " ".join(str(text).lower().split())


def clean_check(value: Any) -> dict[str, str] | None:
    """A check from a trajectory's or incident's metadata, or None when it is not one we run
    (unknown kind, not text, a pattern too long or that does not compile)."""
    if not isinstance(value, dict) or len(value) != 1:
        return None
    (kind, target), *_ = value.items()
    if kind not in ("regex", "ends_with", "contains", "equals") or not isinstance(target, str):
        return None
    if not target.strip() or len(target) > MAX_PATTERN:
        return None
    if kind == "regex":
        try:
            re.compile(target)
        except re.error:
            return None
    return {kind: target}


def passes(case: OutcomeCase, answer: str) -> bool:
    answer = str(answer)[:MAX_ANSWER]
    if case.check:
        (kind, target), *_ = case.check.items()
        if kind == "regex":
            return re.search(target, answer) is not None
        normal, wanted = _normal(answer), _normal(target)
        if kind == "ends_with":
            return normal.endswith(wanted)
        if kind == "contains":
            return wanted in normal
        return normal == wanted
    if case.expected:
        return _normal(case.expected) in _normal(answer)
    return _normal(answer) == _normal(case.reference)


def wilson(passed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``passed``/``n`` (0, 1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(before: tuple[int, int], after: tuple[int, int]) -> tuple[float, float]:
    """95 % interval of after's pass rate minus before's (Newcombe's method 10)."""
    (p1, n1), (p2, n2) = before, after
    if not n1 or not n2:
        return -1.0, 1.0
    r1, r2 = p1 / n1, p2 / n2
    l1, u1 = wilson(p1, n1)
    l2, u2 = wilson(p2, n2)
    diff = r2 - r1
    return (
        diff - math.sqrt((r2 - l2) ** 2 + (u1 - r1) ** 2),
        diff + math.sqrt((u2 - r2) ** 2 + (r1 - l1) ** 2),
    )


def rate(passed: int, n: int) -> dict[str, Any]:
    low, high = wilson(passed, n)
    return {
        "passed": passed,
        "n": n,
        "rate": round(passed / n, 4) if n else None,
        "low": round(low, 4),
        "high": round(high, 4),
    }


def score(
    backend: TrainingBackend,
    cases: Sequence[OutcomeCase],
    *,
    config: TrainConfig,
    adapter_ref: str | None,
) -> dict[str, Any]:
    """Generate an answer to every case with ``adapter_ref`` (None: the base model) and judge
    it: ``{"passed", "n", "rate", "low", "high", "seconds", "answers"}``. Cases are grouped by
    answer length so a backend can generate a group at once."""
    started = time.monotonic()
    answers = [""] * len(cases)
    by_length: dict[int, list[int]] = {}
    for index, case in enumerate(cases):
        by_length.setdefault(case.max_tokens, []).append(index)
    for max_tokens, indices in by_length.items():
        got = backend.sample(
            prompts=[cases[i].prompt for i in indices],
            config=config,
            adapter_ref=adapter_ref,
            max_tokens=max_tokens,
        )
        for i, answer in zip(indices, got, strict=True):
            answers[i] = answer
    passed = sum(passes(case, answer) for case, answer in zip(cases, answers, strict=True))
    return {
        **rate(passed, len(cases)),
        "seconds": round(time.monotonic() - started, 2),
        "answers": answers,
    }


def verdict(before: dict[str, Any], after: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``after`` (the candidate's score) improves on ``before`` (the active version's),
    and the sentence that says so on the run page, in the API and in the notification."""
    n = after["n"]
    low, high = difference_interval((before["passed"], before["n"]), (after["passed"], n))
    diff = (after["rate"] or 0.0) - (before["rate"] or 0.0)
    figures = (
        f"held-out outcomes {before['passed']}/{before['n']} → {after['passed']}/{n} passed "
        f"(difference {100 * diff:+.0f} points, 95 % interval "
        f"{100 * low:+.0f} to {100 * high:+.0f})"
    )
    if low > 0:
        return True, f"Improved: {figures}."
    if after["passed"] == before["passed"]:
        return False, f"Changes no outcome: {figures}."
    if high < 0:
        return False, f"Worse: {figures}."
    return False, f"No improvement the sample supports: {figures}."
