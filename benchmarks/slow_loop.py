"""How fast the slow loop builds a clean dataset, and how fast it trains locally.

    python benchmarks/slow_loop.py [--count 10000] [--steps 10] [--base-model smollm2-135m]

1. Stores ``--count`` varied trajectories (some exact duplicates, secrets, failures, corrected
   answers, over-long histories) in a throwaway project in PostgreSQL (database
   ``metaclaw_bench_slow`` unless ``DATABASE_URL`` says otherwise; migrated first), then times
   ``training.datasets.services.dataset_build`` over them: trajectories/s, with the cleaning report.
2. Trains ``--steps`` LoRA steps on the local backend (``benchmarks/slow_loop_train.py``, in a
   fresh process) and reports tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time

from _harness import NOUNS, PLACES, VERBS, django_ready, throwaway_project

django_ready("metaclaw_bench_slow")

from incidents.ingest import trajectories_ingest  # noqa: E402
from incidents.schemas import TrajectoryIn  # noqa: E402

SECRETS = [
    "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
    "jane.doe@example.com",
    "password: Hunter2Hunter2",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
]


def _payloads(count: int, seed: int = 11) -> list[TrajectoryIn]:
    rng = random.Random(seed)
    items: list[TrajectoryIn] = []
    for n in range(count):
        verb, noun, other = rng.choice(VERBS), rng.choice(NOUNS), rng.choice(NOUNS)
        place = rng.choice(PLACES)
        question = (
            f"How do I {verb} the {noun} linked to {other} #{rng.randrange(10_000)} "
            f"in the {rng.choice(['EU', 'US', 'APAC'])} workspace?"
        )
        if rng.random() < 0.05:
            question += f" My details: {rng.choice(SECRETS)}"
        answer = (
            f"Open {place} > {noun.title()}s, select the {other} entry, and choose "
            f"'{verb.title()}'. It takes effect within {rng.randrange(1, 60)} minutes."
        )
        roll = rng.random()
        reward, outcome, corrected = 1.0, "success", ""
        if roll < 0.15:
            reward, outcome = -1.0, "failure"
        elif roll < 0.20:
            reward, outcome, corrected = -1.0, "failure", answer
            answer = "I cannot help with that."
        history = []
        if rng.random() < 0.1:
            history = [
                {"role": "user", "content": "Earlier question. " * 150},
                {"role": "assistant", "content": "Earlier answer. " * 150},
            ]
        items.append(
            TrajectoryIn(
                id=f"bench-{n}",
                session_id=f"bench-session-{n // 4}",
                policy_version=1,
                messages=[
                    {"role": "system", "content": "You are the support assistant."},
                    *history,
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
                reward=reward,
                outcome=outcome,
                corrected_answer=corrected,
            )
        )
    # Retries reported twice under new ids: exact duplicates.
    for k in range(0, count // 20):
        items[k * 20] = items[k * 20 + 1].model_copy(update={"id": f"bench-dup-{k}"})
    return items


def measure_dataset_build(count: int) -> dict:
    from training.datasets import services as datasets_services
    from training.policy import services as policy_services

    with throwaway_project("slow-loop bench") as project:
        payloads = _payloads(count)
        started = time.perf_counter()
        for start in range(0, len(payloads), 1000):
            trajectories_ingest(project=project, items=payloads[start : start + 1000])
        ingest_seconds = time.perf_counter() - started
        policy_services.idle_policy_update(project=project, max_tokens_per_run=10_000_000)
        datasets_services.dataset_build(
            project=project, chunk_size=50
        )  # warm: embedder load, caches
        started = time.perf_counter()
        dataset = datasets_services.dataset_build(project=project)
        seconds = time.perf_counter() - started
        report = dataset.report
        return {
            "trajectories": report["considered"],
            "build_seconds": round(seconds, 2),
            "trajectories_per_second": round(report["considered"] / seconds, 1),
            "kept": report["kept"],
            "dropped": report["dropped"],
            "cut_to_fit": report["cut_to_fit"],
            "redactions": report["redactions"],
            "ingest_seconds": round(ingest_seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    print("== dataset building ==", flush=True)
    print(json.dumps(measure_dataset_build(args.count), indent=2), flush=True)
    if args.skip_training:
        return
    print("== local LoRA training ==", flush=True)
    from slow_loop_train import measure_local_training

    print(json.dumps(measure_local_training(args.steps, args.base_model), indent=2), flush=True)


if __name__ == "__main__":
    main()
