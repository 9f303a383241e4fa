"""The cap per source of a dataset: no one end user or session shapes the adapter.

A sample's source is its end user when the agent names one, else its session; a sample with
neither is a source of its own (nothing ties it to others). Beyond ``DATASET_SOURCE_FLOOR``
samples, no source gives more than ``DATASET_MAX_SOURCE_SHARE`` of the samples the cap sees;
its oldest go first. Sessions and end users a person marked abusive never get this far
(``incidents.selectors.abusive_values``)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings

# Sources named in a report (the most dropped first).
REPORTED_SOURCES = 20

_Sample = TypeVar("_Sample")


def cap_per_source(
    kept: list[_Sample], *, source: Callable[[_Sample], str], drop: Callable[[_Sample], None]
) -> tuple[list[_Sample], dict[str, Any]]:
    """``kept`` (oldest first) without each source's oldest samples over the cap, and the
    report's ``sources``: the share and floor, the cap they make, how many distinct sources,
    the largest one's share, and how many samples were dropped from which source. ``drop``
    counts each sample dropped."""
    share = float(settings.METACLAW.get("DATASET_MAX_SOURCE_SHARE", 0.05))
    floor = int(settings.METACLAW.get("DATASET_SOURCE_FLOOR", 20))
    cap = max(floor, math.floor(share * len(kept)))
    counts: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    capped: list[_Sample] = []
    for sample in reversed(kept):
        name = source(sample)
        if counts[name] >= cap:
            dropped[name] += 1
            drop(sample)
            continue
        counts[name] += 1
        capped.append(sample)
    capped.reverse()
    return capped, {
        "max_share": share,
        "floor": floor,
        "cap": cap,
        "distinct": len(counts),
        "largest_share": round(max(counts.values()) / len(capped), 4) if capped else 0.0,
        "capped_sources": len(dropped),
        "capped": dict(dropped.most_common(REPORTED_SOURCES)),
    }
