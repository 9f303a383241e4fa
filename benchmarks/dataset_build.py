"""How the dataset build grows with the project's history (issue 18), and what the near-duplicate
detection costs before and after MinHash + LSH (issue 21).

    python benchmarks/dataset_build.py [--sizes 1000 100000] [--before-max 100000]

For each size, stores that many varied trajectories (exact duplicates, near duplicates with a
little noise, secrets, failures, corrected answers) in a throwaway project in PostgreSQL
(database ``metaclaw_bench_dataset`` unless ``DATABASE_URL`` says otherwise; migrated first),
loaded with ``COPY`` (``incidents.ingest.trajectories_store``) so that 100k rows take seconds,
then times ``training.datasets.services.dataset_build`` over them and prints the time per
sample: it must stay about flat as the history grows (the work is linear in the samples).

"Before": the same build with the near-duplicate detection it had before (every sample's
embedding compared with every earlier one's, quadratic), up to ``--before-max`` samples; and
both detections alone on the same texts. The two detections do not drop exactly the same
samples (cosine of embeddings against Jaccard of word 3-grams); both counts are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

import numpy as np
from _harness import NOUNS, PLACES, VERBS, django_ready, throwaway_project

django_ready("metaclaw_bench_dataset", redis_db=2)

from django.utils import timezone  # noqa: E402

from base.models import Project  # noqa: E402
from incidents.ingest import trajectories_store  # noqa: E402
from incidents.models import Trajectory  # noqa: E402
from training.datasets import dedup  # noqa: E402
from training.datasets import services as datasets_services  # noqa: E402
from training.policy import services as policy_services  # noqa: E402

ADVERBS = "quickly safely again today now first manually automatically".split()
SECRETS = ["sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c", "jane.doe@example.com"]
SYSTEM = {"role": "system", "content": "You are the support assistant."}


def _rows(project: Project, count: int, seed: int = 11) -> list[Trajectory]:
    """``count`` trajectories: about 5% exact repeats, 3% near repeats of an earlier turn (a
    word added, other case), 15% failures, 5% corrected answers, 3% with a secret."""
    rng = random.Random(seed)
    start = timezone.now() - timedelta(days=30)
    exchanges: list[tuple[str, str]] = []
    rows: list[Trajectory] = []
    for n in range(count):
        roll = rng.random()
        if exchanges and roll < 0.05:
            question, answer = rng.choice(exchanges)
        elif exchanges and roll < 0.08:
            question, answer = rng.choice(exchanges)
            question = question.rstrip("?").upper() + " please?"
        else:
            verb, noun, other = rng.choice(VERBS), rng.choice(NOUNS), rng.choice(NOUNS)
            question = (
                f"How do I {verb} the {noun} linked to {other} #{rng.randrange(100_000)} "
                f"{rng.choice(ADVERBS)} in the {rng.choice(['EU', 'US', 'APAC'])} workspace?"
            )
            if rng.random() < 0.03:
                question += f" My details: {rng.choice(SECRETS)}"
            answer = (
                f"Open {rng.choice(PLACES)} > {noun.title()}s, select the {other} entry "
                f"#{rng.randrange(100_000)}, and choose '{verb.title()}'. It takes effect "
                f"within {rng.randrange(1, 60)} minutes; {rng.choice(NOUNS)}s stay as they are."
            )
            exchanges.append((question, answer))
        reward, outcome, corrected = 1.0, "success", ""
        fate = rng.random()
        if fate < 0.15:
            reward, outcome = -1.0, "failure"
        elif fate < 0.20:
            reward, outcome, corrected = -1.0, "failure", answer
        messages = [
            SYSTEM,
            {"role": "user", "content": question},
            {"role": "assistant", "content": "I cannot help with that." if corrected else answer},
        ]
        at = start + timedelta(seconds=n)
        rows.append(
            Trajectory(
                id=uuid.uuid4(),
                project=project,
                client_id=f"bench-{n}",
                session_id=f"bench-session-{n // 4}",
                policy_version=1,
                messages=messages,
                reward=reward,
                outcome=outcome,
                corrected_answer=corrected,
                occurred_at=at,
                received_at=at,
            )
        )
    return rows


def embedding_near_duplicates_before(texts: list[str], threshold: float = 0.95) -> list[bool]:
    """The detection the build had before (kept here to compare): every text's embedding
    against every earlier one's, in blocks. Quadratic in the number of texts."""
    from skills.library.embeddings import get_embedder

    if len(texts) < 2:
        return [False] * len(texts)
    vectors = get_embedder().embed(texts)
    flags = [False] * len(texts)
    block = 1024
    for start in range(0, len(texts), block):
        stop = min(start + block, len(texts))
        sims = vectors[start:stop] @ vectors[:stop].T
        mask = np.tril(np.ones((stop - start, stop), dtype=bool), k=start - 1)
        hits = np.any((sims >= threshold) & mask, axis=1)
        for offset, hit in enumerate(hits):
            flags[start + offset] = bool(hit)
    return flags


def _build(project: Project, *, before: bool) -> tuple[float, dict, list[str]]:
    """Seconds for one build, its report, and the texts its near-duplicate step looked at."""
    texts: list[str] = []
    after = datasets_services.near_duplicates

    def detect(found: list[str], threshold: float, check=lambda: None) -> list[bool]:
        texts.extend(found)
        if before:
            return embedding_near_duplicates_before(found)
        return after(found, threshold, check)

    datasets_services.near_duplicates = detect
    try:
        started = time.perf_counter()
        dataset = datasets_services.dataset_build(project=project)
        seconds = time.perf_counter() - started
    finally:
        datasets_services.near_duplicates = after
    report = dataset.report
    dataset.delete()
    return seconds, report, texts


def _timed_detection(detect: Callable[[list[str]], list[bool]], texts: list[str]) -> dict:
    """One near-duplicate detection alone over ``texts``: its time and what it found."""
    started = time.perf_counter()
    flags = detect(texts)
    seconds = time.perf_counter() - started
    return {
        "texts": len(texts),
        "seconds": round(seconds, 3),
        "ms_per_text": round(1000 * seconds / max(1, len(texts)), 4),
        "near_duplicates": sum(flags),
    }


def measure(count: int, before_max: int) -> dict:
    with throwaway_project("dataset bench") as project:
        started = time.perf_counter()
        rows = _rows(project, count)
        for start in range(0, len(rows), 20_000):
            trajectories_store(trajectories=rows[start : start + 20_000])
        load_seconds = time.perf_counter() - started
        del rows
        policy_services.idle_policy_update(project=project, max_tokens_per_run=100_000_000)
        # Warm: the embedder's model, caches, the database's buffers.
        embedding_near_duplicates_before(["warm up", "warm up the embedder"])
        _build(project, before=False)

        seconds, report, texts = _build(project, before=False)
        result: dict = {
            "trajectories": report["considered"],
            "load_seconds_copy": round(load_seconds, 2),
            "build_seconds": round(seconds, 2),
            "build_ms_per_sample": round(1000 * seconds / report["considered"], 3),
            "kept": report["kept"],
            "dropped": report["dropped"],
        }
        result["dedup_after_minhash_lsh"] = _timed_detection(
            lambda found: dedup.near_duplicates(found, datasets_services.NEAR_DUPLICATE_THRESHOLD),
            texts,
        )
        if report["considered"] <= before_max:
            result["dedup_before_embeddings_all_pairs"] = _timed_detection(
                embedding_near_duplicates_before, texts
            )
            seconds, report, _ = _build(project, before=True)
            result["build_before"] = {
                "build_seconds": round(seconds, 2),
                "build_ms_per_sample": round(1000 * seconds / report["considered"], 3),
                "dropped": report["dropped"],
            }
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument(
        "--before-max",
        type=int,
        default=100_000,
        help="measure the quadratic detection only up to this many samples",
    )
    args = parser.parse_args()
    results = {}
    for size in args.sizes:
        print(f"== {size} trajectories ==", flush=True)
        results[size] = measure(size, args.before_max)
        print(json.dumps(results[size], indent=2), flush=True)
    if len(results) > 1:
        smallest, largest = results[min(results)], results[max(results)]
        growth = largest["build_ms_per_sample"] / smallest["build_ms_per_sample"]
        print(
            f"Time per sample grew {growth:.2f}x from {min(results)} to {max(results)} "
            "trajectories (flat is linear).",
            flush=True,
        )


if __name__ == "__main__":
    main()
