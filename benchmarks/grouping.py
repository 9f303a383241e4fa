"""How well MetaClaw groups real agents' failures by failure mode, on the hand-labelled airline
corpus (``tests/fixtures/airline``: 117 failed runs of a tool-calling support agent, 34 modes).

Each run posts the corpus, in a shuffled order, through the public batch API of a fresh
project, then lets the fast loop take every waiting group as a worker would
(``group_synthesize``, with no LLM configured: the similarity merge runs first, then the
evidence draft). It prints, per run and as the spread over runs:

- groups (open groups, merged ones not counted) and the ratio groups / labelled modes;
- singletons (groups of one incident) and their share of the groups;
- purity: the share of incidents whose group's majority mode is their own;
- the same figures for the fingerprint alone (before the similarity merge), as the baseline.

Targets (issue "Real agents' failures"): purity >= 0.95, groups <= 1.5 x modes, singletons
<= 20 %.

    python benchmarks/grouping.py [--runs 3] [--threshold 0.55]
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
from collections import Counter
from pathlib import Path

from _harness import ROOT, bench_env, django_setup, ensure_database

CORPUS = ROOT / "tests" / "fixtures" / "airline" / "failures.jsonl"
TARGETS = {"purity": 0.95, "ratio": 1.5, "singletons": 0.20}


def figures(groups: dict[int, list[str]], modes: int) -> dict[str, float]:
    total = sum(len(v) for v in groups.values())
    majority = sum(Counter(v).most_common(1)[0][1] for v in groups.values())
    singletons = sum(len(v) == 1 for v in groups.values())
    return {
        "groups": len(groups),
        "ratio": len(groups) / modes,
        "singletons": singletons,
        "singleton_share": singletons / len(groups),
        "purity": majority / total,
    }


def line(name: str, f: dict[str, float]) -> str:
    return (
        f"{name:<22} groups {f['groups']:>3} ({f['ratio']:.2f} x modes)  singletons "
        f"{f['singletons']:>2} ({f['singleton_share']:.0%})  purity {f['purity']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="shuffled orders, one project each")
    parser.add_argument("--threshold", type=float, default=0.0, help="0 = the site default")
    parser.add_argument("--batch", type=int, default=20, help="incidents per API request")
    args = parser.parse_args()

    env = bench_env("metaclaw_bench_grouping", redis_db=9)
    env.update(CELERY_TASK_ALWAYS_EAGER="0", METACLAW_OUTBOX_SWEEP_AFTER_SECONDS="3600")
    env.pop("METACLAW_LLM_BASE_URL", None)
    env.pop("OPENAI_BASE_URL", None)
    ensure_database(env, fresh=True)
    django_setup(env)

    from django.test import Client

    from base import services as base_services
    from incidents import signals
    from incidents.models import Incident, IncidentGroup
    from metaclaw_site.projects import project_create
    from skills.library.embeddings import get_embedder
    from skills.synthesis.services import group_synthesize
    from skills.synthesis.similar import merge_threshold

    signals.groups_await_synthesis.receivers.clear()  # no worker here: this process is one
    rows = [json.loads(text) for text in Path(CORPUS).read_text().splitlines()]
    mode_of = {row["incident"]["id"]: row["mode"] for row in rows}
    modes = len(set(mode_of.values()))
    client = Client(HTTP_HOST="127.0.0.1")
    print(
        f"corpus: {len(rows)} failed runs, {modes} labelled modes; embedder {get_embedder().name}"
    )
    before_runs, after_runs = [], []
    for run in range(args.runs):
        project = project_create(name=f"Grouping {run}", slug=f"grouping-{secrets.token_hex(3)}")
        if args.threshold:
            project.group_merge_threshold = args.threshold
            project.save(update_fields=["group_merge_threshold"])
        key = base_services.api_key_create(project=project, name="bench", scopes=["ingest"])
        items = [row["incident"] for row in rows]
        random.Random(run).shuffle(items)
        for start in range(0, len(items), args.batch):
            response = client.post(
                "/api/v1/incidents/batch",
                {"items": items[start : start + args.batch]},
                content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {key.secret}",
            )
            body = response.json()
            if response.status_code not in (200, 207) or body.get("rejected"):
                raise SystemExit(f"ingest refused items: {response.status_code} {body}")

        def grouped(project=project) -> dict[int, list[str]]:
            groups: dict[int, list[str]] = {}
            for client_id, group_id in Incident.objects.filter(project=project).values_list(
                "client_id", "group_id"
            ):
                groups.setdefault(group_id, []).append(mode_of[client_id])
            return groups

        before = figures(grouped(), modes)
        # Workers take waiting groups in the order they were created.
        for group_id in (
            IncidentGroup.objects.filter(project=project)
            .order_by("pk")
            .values_list("pk", flat=True)
        ):
            group_synthesize(group_id=group_id)
        after = figures(grouped(), modes)
        before_runs.append(before)
        after_runs.append(after)
        print(f"run {run + 1} (threshold {merge_threshold(project):.2f}):")
        print("  " + line("fingerprint only", before))
        print("  " + line("with similarity merge", after))

    def spread(runs: list[dict[str, float]], key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        return (
            f"median {format(statistics.median(values), fmt)} "
            f"(min {format(min(values), fmt)}, max {format(max(values), fmt)})"
        )

    print(f"over {args.runs} runs, with the similarity merge:")
    print(f"  purity      {spread(after_runs, 'purity', '.3f')}   target >= {TARGETS['purity']}")
    print(f"  groups      {spread(after_runs, 'groups', '.0f')}   for {modes} modes")
    print(f"  ratio       {spread(after_runs, 'ratio', '.2f')}   target <= {TARGETS['ratio']}")
    print(
        f"  singletons  {spread(after_runs, 'singleton_share', '.0%')}   "
        f"target <= {TARGETS['singletons']:.0%}"
    )
    print("baseline, the fingerprint alone:")
    print(f"  purity      {spread(before_runs, 'purity', '.3f')}")
    print(f"  ratio       {spread(before_runs, 'ratio', '.2f')}")
    print(f"  singletons  {spread(before_runs, 'singleton_share', '.0%')}")
    met = all(
        r["purity"] >= TARGETS["purity"]
        and r["ratio"] <= TARGETS["ratio"]
        and r["singleton_share"] <= TARGETS["singletons"]
        for r in after_runs
    )
    print("targets met in every run" if met else "TARGETS MISSED in at least one run")


if __name__ == "__main__":
    main()
