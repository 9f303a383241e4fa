"""How well the proxy's retrieval finds the skill a request needs, on a labelled set
(``benchmarks/data/retrieval_set.json``: ten skills of a support agent, ten requests of each
skill's family in varied wordings, and forty requests where no skill applies).

Each request goes through the proxy's own path: ``query_from_messages`` on a one-message chat,
then ``skills_retrieve`` over an in-memory policy snapshot built as the runtime builds one
(the configured embedder, ``METACLAW_EMBEDDINGS``), with the runtime's top-k and token budget.
Per threshold (``min_score``) it prints:

- recall: the share of the family requests whose skill was injected;
- precision: the share of injected skills that were the request's own (an injection into a
  request where no skill applies is a wrong one);
- top-1: the share of family requests whose best injected skill is their own;
- unrelated: the share of no-skill requests that got any skill injected.

The default threshold (``METACLAW["RETRIEVAL_MIN_SCORE"]``) is set from these figures: a skill
written for a request family must reach most of it (recall >= 0.8) while precision stays
reasonable. No database is needed.

    python benchmarks/retrieval.py [--thresholds 0.1,0.2,0.3] [--misses]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "retrieval_set.json"
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.12, 0.14, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
RECALL_TARGET = 0.8


@dataclass(frozen=True)
class Figures:
    threshold: float
    recall: float
    precision: float
    top1: float
    unrelated_hit: float
    injected_per_request: float
    worst_family: tuple[str, float]  # the family the fewest of whose requests got their skill
    misses: tuple[tuple[str, str, float | None], ...]  # (slug, request, its own skill's score)


def load_set(path: Path = DATA) -> dict[str, Any]:
    return json.loads(path.read_text())


def snapshot_of(skills: Sequence[dict[str, Any]]) -> Any:
    """A policy snapshot of ``skills`` built as ``skills.runtime.policy`` builds one."""
    from skills.library.embeddings import get_embedder, skill_text
    from skills.runtime.policy import PolicySnapshot, SkillEntry, estimate_tokens

    entries = tuple(
        SkillEntry(
            revision_id=index + 1,
            slug=s["slug"],
            name=s["name"],
            description=s["description"],
            instructions=s["instructions"],
            category="",
            revision=1,
            tokens=estimate_tokens(f"### {s['name']}\n_{s['description']}_\n\n{s['instructions']}"),
        )
        for index, s in enumerate(skills)
    )
    matrix = get_embedder().embed(
        [skill_text(e.name, e.description, e.instructions) for e in entries]
    )
    return PolicySnapshot(
        project_id=0,
        version_id=0,
        number=1,
        status="active",
        adapter_ref="",
        base_model="",
        skills=entries,
        matrix=matrix,
        etag='"bench"',
        body=b"",
        generation=0,
    )


def evaluate(
    data: dict[str, Any], thresholds: Sequence[float], margin: float | None = None
) -> list[Figures]:
    """Retrieval figures of the labelled set ``data`` at each threshold, with the proxy's
    ``margin`` below the best skill (None: none, as the pull API)."""
    from skills.library.embeddings import get_embedder
    from skills.runtime import retrieval

    snapshot = snapshot_of(data["skills"])
    index_of = {entry.slug: i for i, entry in enumerate(snapshot.skills)}
    labelled = [(s["slug"], text) for s in data["skills"] for text in s["requests"]]
    labelled += [("", text) for text in data["unrelated"]]
    queries = {
        text: retrieval.query_from_messages([{"role": "user", "content": text}])
        for _, text in labelled
    }
    own_scores = {
        (slug, text): float(
            snapshot.matrix[index_of[slug]] @ get_embedder().embed_one(queries[text])
        )
        for slug, text in labelled
        if slug
    }
    out = []
    for threshold in thresholds:
        found = injected = right = top1 = unrelated_hit = 0
        misses: list[tuple[str, str, float | None]] = []
        per_family = {slug: 0 for slug in index_of}
        for slug, text in labelled:
            chosen = retrieval.skills_retrieve(
                snapshot=snapshot, query=queries[text], min_score=threshold, margin=margin
            )
            slugs = [r.skill.slug for r in chosen]
            injected += len(slugs)
            if not slug:
                unrelated_hit += bool(slugs)
                continue
            right += slugs.count(slug)
            if slug in slugs:
                found += 1
                per_family[slug] += 1
            else:
                misses.append((slug, text, round(own_scores[(slug, text)], 3)))
            top1 += bool(slugs) and slugs[0] == slug
        family = sum(1 for slug, _ in labelled if slug)
        sizes = {s["slug"]: len(s["requests"]) for s in data["skills"]}
        worst = min(per_family, key=lambda slug: per_family[slug] / sizes[slug])
        out.append(
            Figures(
                threshold=threshold,
                recall=found / family,
                precision=right / injected if injected else 1.0,
                top1=top1 / family,
                unrelated_hit=unrelated_hit / len(data["unrelated"]),
                injected_per_request=injected / len(labelled),
                misses=tuple(misses),
                worst_family=(worst, per_family[worst] / sizes[worst]),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--thresholds",
        default=",".join(str(t) for t in DEFAULT_THRESHOLDS),
        help="comma-separated min_score values",
    )
    parser.add_argument("--misses", action="store_true", help="list the family requests missed")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "metaclaw_site.settings")
    os.environ.setdefault("SECRET_KEY", "benchmark-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.conf import settings

    from skills.library.embeddings import get_embedder
    from skills.runtime import retrieval

    data = load_set()
    default = float(settings.METACLAW["RETRIEVAL_MIN_SCORE"])
    thresholds = sorted({float(t) for t in args.thresholds.split(",") if t.strip()} | {default})
    family = sum(len(s["requests"]) for s in data["skills"])
    print(
        f"embedder {get_embedder().name}; {len(data['skills'])} skills, {family} family "
        f"requests, {len(data['unrelated'])} unrelated; top-k {retrieval.DEFAULT_TOP_K}, "
        f"token budget {retrieval.DEFAULT_TOKEN_BUDGET}"
    )
    margin = retrieval.margin_default()
    for label, m in (("no margin (the pull API)", None), (f"margin {margin} (the proxy)", margin)):
        if label.startswith("margin") and m is None:
            continue
        print(f"\n{label}")
        print("threshold  recall  precision  top-1  unrelated-hit  injected/request  worst family")
        for f in evaluate(data, thresholds, m):
            mark = "  <- default" if f.threshold == default else ""
            print(
                f"{f.threshold:>9.2f}  {f.recall:>6.2f}  {f.precision:>9.2f}  {f.top1:>5.2f}  "
                f"{f.unrelated_hit:>13.2f}  {f.injected_per_request:>16.2f}  "
                f"{f.worst_family[1]:.2f} {f.worst_family[0]}{mark}"
            )
            if args.misses and f.threshold == default and m == margin:
                for slug, text, score in f.misses:
                    print(f"    missed {slug:<24} {score:>6}  {text}")
    print(
        f"\ntarget: at the default threshold ({default}), every skill reaches >= "
        f"{RECALL_TARGET} of its request family (worst family)"
    )


if __name__ == "__main__":
    main()
