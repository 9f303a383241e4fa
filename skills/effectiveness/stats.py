"""The statistics of a before/after comparison of incident rates, in plain Python.

Incidents are counted against turns (the exposure) in two windows. Treating each count as
Poisson, the count after, given the total, is binomial: ``k_after ~ Bin(k, π)`` with
``π = RR·n_after / (n_before + RR·n_after)``, where RR is the ratio of the rates (after over
before). A Wilson score interval for π, mapped back through ``RR = π/(1−π) · n_before/n_after``,
is a 95 % interval for the ratio that stays sensible with zero incidents on one side."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054

IMPROVED = "improved"
NO_CHANGE = "no_change"
WORSE = "worse"
TOO_THIN = "too_thin"
NOT_LIVE = "not_live"

VERDICT_LABELS = {
    IMPROVED: "Improved",
    NO_CHANGE: "No change",
    WORSE: "Worse",
    TOO_THIN: "Too little traffic to tell",
    NOT_LIVE: "Not live yet",
}


def per_thousand(incidents: int, turns: int) -> float | None:
    return None if turns <= 0 else round(incidents * 1000 / turns, 3)


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    z2 = z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class RateComparison:
    """Incidents and turns before and after, the rate ratio (after / before) and its interval.
    ``None`` for a bound means unbounded (or undefined: no incident on either side)."""

    incidents_before: int
    turns_before: int
    incidents_after: int
    turns_after: int
    rate_before: float | None
    rate_after: float | None
    ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    verdict: str

    @property
    def verdict_label(self) -> str:
        return VERDICT_LABELS[self.verdict]

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict_label": self.verdict_label}


def _ratio_from_share(share: float, turns_before: int, turns_after: int) -> float | None:
    if share >= 1.0:
        return None
    return round(share / (1 - share) * turns_before / turns_after, 4)


def compare(
    *,
    incidents_before: int,
    turns_before: int,
    incidents_after: int,
    turns_after: int,
    min_turns: int,
    min_incidents: int,
) -> RateComparison:
    """Compare the rates; the verdict is TOO_THIN while either window has fewer than
    ``min_turns`` turns or both together fewer than ``min_incidents`` incidents, else IMPROVED
    (the interval lies below 1), WORSE (above 1) or NO_CHANGE (it holds 1)."""
    total = incidents_before + incidents_after
    ratio = low = high = None
    if turns_before > 0 and turns_after > 0 and total > 0:
        if incidents_before:
            ratio = round((incidents_after / turns_after) / (incidents_before / turns_before), 4)
        share_low, share_high = wilson(incidents_after, total)
        low = _ratio_from_share(share_low, turns_before, turns_after)
        high = _ratio_from_share(share_high, turns_before, turns_after)
    if min(turns_before, turns_after) < min_turns or total < min_incidents or total == 0:
        verdict = TOO_THIN
    elif high is not None and high < 1.0:
        verdict = IMPROVED
    elif low is not None and low > 1.0:
        verdict = WORSE
    else:
        verdict = NO_CHANGE
    return RateComparison(
        incidents_before=incidents_before,
        turns_before=turns_before,
        incidents_after=incidents_after,
        turns_after=turns_after,
        rate_before=per_thousand(incidents_before, turns_before),
        rate_after=per_thousand(incidents_after, turns_after),
        ratio=ratio,
        ratio_low=low,
        ratio_high=high,
        verdict=verdict,
    )
