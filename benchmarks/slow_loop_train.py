"""How fast the slow loop trains a LoRA adapter on this machine, and how much memory it takes.

    python benchmarks/slow_loop_train.py            # 10 steps on smollm2-135m
    python benchmarks/slow_loop_train.py 20 tiny-random-smollm2

The training runs in a fresh child process so that its peak RSS is the training's own, not
that of the one-off GGUF conversion (or of whatever imported this module).
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.backends.base import ChatSample, TrainConfig  # noqa: E402

_TOPICS = [
    ("the nightly export failed with a timeout", "rerun it with a larger batch window"),
    ("the payment webhook returns 502", "rotate the signing secret and replay the queue"),
    ("disk usage on db-2 is at 91%", "vacuum the audit table and extend the volume"),
    ("the worker pool keeps restarting", "lower the prefetch count and check the OOM killer log"),
    ("users see stale dashboards", "invalidate the cache key prefix and redeploy the reader"),
    ("the TLS certificate expires tomorrow", "renew it through the ACME job and reload nginx"),
    ("search results are empty for new items", "restart the indexer and reindex since noon"),
    ("login emails arrive late", "move the mailer to the priority queue and watch the retries"),
]


def _samples() -> list[ChatSample]:
    """Incident-sized conversations (~90 tokens each with the template)."""
    return [
        ChatSample(
            messages=[
                {"role": "system", "content": "You are the on-call assistant. Be precise."},
                {"role": "user", "content": f"Alert: {problem}. What should I do first?"},
                {
                    "role": "assistant",
                    "content": f"First confirm the alert is real, then {fix}. "
                    "Post a note in the incident channel when done.",
                },
            ]
        )
        for problem, fix in _TOPICS
    ]


def _train_in_child(steps: int, base_model: str, batch_size: int, cache_dir: str | None) -> dict:
    from training.backends.local import LocalBackend

    backend = LocalBackend(cache_dir=cache_dir)
    with tempfile.TemporaryDirectory() as output_dir:
        config = TrainConfig(
            base_model=base_model,
            total_steps=steps,
            batch_size=batch_size,
            learning_rate=1e-4,
            output_dir=output_dir,
        )
        started = time.perf_counter()
        result = backend.train(
            samples=_samples(), config=config, on_step=lambda r: None, should_pause=lambda: False
        )
        wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "base_model": base_model,
        "steps": result.steps_done,
        "batch_size": batch_size,
        "tokens": int(result.metrics["tokens"]),
        "train_seconds": round(result.metrics["train_seconds"], 2),
        "tokens_per_second": round(result.metrics["tokens_per_second"], 1),
        # Includes loading the base model and saving the adapter.
        "wall_seconds": round(wall, 2),
        "final_loss": round(result.metrics["loss"], 4),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


def measure_local_training(
    steps: int, base_model: str, *, batch_size: int = 4, cache_dir: str | None = None
) -> dict:
    """Train ``steps`` LoRA steps on ``base_model`` and report throughput and peak memory.

    ``tokens_per_second`` counts every non-padding token through forward and backward, over
    the optimizer loop only; ``peak_rss_mib`` is the training process's maximum resident set.
    """
    from training.backends.local import resolve_base_model

    started = time.perf_counter()
    resolve_base_model(base_model, cache_dir)  # a one-off conversion is not training time
    prepare_seconds = time.perf_counter() - started
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        figures = pool.submit(_train_in_child, steps, base_model, batch_size, cache_dir).result()
    figures["prepare_model_seconds"] = round(prepare_seconds, 2)
    return figures


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    model = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
    print(json.dumps(measure_local_training(steps, model), indent=2))
