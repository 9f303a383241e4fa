"""A fast-loop Celery worker with timers, for ``fast_loop.py`` and ``guard.py``.

    python benchmarks/_probe.py -A metaclaw_site worker -Q fast ...   (celery's own arguments)

runs the production worker after wrapping the steps of a synthesis with timers, and adds an
empty task, ``bench.empty``: its round trip (sent → running on the same worker) is the baseline
a fast-loop task is compared with. Nothing in the project changes: the wrappers replace module
attributes in the worker's main process before the pool forks, and time only the outermost step
(a step called from inside another counts as that one).

After each task its record is pushed to the Redis list ``bench:stages`` (of ``REDIS_URL``) as
JSON: ``{"task", "args", "start", "end", "stages": {step: ms}}``; ``bench.empty`` adds its
``sent``. Times are ``time.time()``: one machine, one clock.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery.signals import task_postrun, task_prerun, worker_init  # noqa: E402

from metaclaw_site.celery import app  # noqa: E402

RECORDS = "bench:stages"

# (module, attribute, step) in the order a synthesis reaches them.
STEPS = [
    ("incidents.services", "group_synthesis_claim", "claim"),
    ("skills.synthesis.similar", "merge_into_similar_group", "merge check"),
    ("skills.synthesis.services", "group_provenance", "provenance"),
    ("skills.synthesis.services", "active_revision_for_group", "evidence"),
    ("skills.synthesis.services", "gather_evidence", "evidence"),
    ("skills.synthesis.similar", "group_vectors", "similar skills"),
    ("skills.synthesis.similar", "latest_revisions", "similar skills"),
    ("skills.synthesis.similar", "similar_skills", "similar skills"),
    ("skills.synthesis.services", "budget_exceeded", "prompt"),
    ("skills.synthesis.services", "prompt_messages", "prompt"),
    ("skills.synthesis.llm", "complete_json", "LLM round trip"),
    ("skills.synthesis.services", "usage_record", "store"),
    ("skills.synthesis.services", "validate", "store"),
    ("skills.synthesis.services", "skill_revision_propose", "store"),
    ("skills.synthesis.services", "finish", "store"),
    ("skills.approvals.receivers", "approval_notify", "notify"),
    ("skills.synthesis.similar", "link_related_groups", "link related"),
]

# Per thread: a worker with ``-P threads`` runs several tasks at once in one process.
_state = threading.local()


def _task_state() -> tuple[dict, list[int]]:
    """This thread's record of its current task, and how deep in timed steps it is."""
    if not hasattr(_state, "current"):
        _state.current, _state.depth = {}, [0]
    return _state.current, _state.depth


_redis = []


def _timed(function, step: str):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _current, _depth = _task_state()
        if _depth[0]:
            return function(*args, **kwargs)
        _depth[0] += 1
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _depth[0] -= 1
            stages = _current.setdefault("stages", {})
            stages[step] = stages.get(step, 0.0) + (time.perf_counter() - started) * 1000

    return wrapper


@worker_init.connect
def _install(**kwargs) -> None:
    """After the project's own ``worker_init`` (connected first): every module is imported."""
    import importlib

    for module_name, attribute, step in STEPS:
        module = importlib.import_module(module_name)
        setattr(module, attribute, _timed(getattr(module, attribute), step))


@task_prerun.connect
def _started(task_id=None, task=None, args=None, **kwargs) -> None:
    _current, _depth = _task_state()
    _current.clear()
    _current.update(task=task.name, args=list(args or ()), start=time.time(), stages={})
    _depth[0] = 0


@task_postrun.connect
def _ended(task_id=None, task=None, **kwargs) -> None:
    _current, _ = _task_state()
    if "start" not in _current:
        return
    _current["end"] = time.time()
    if not _redis:
        import redis

        _redis.append(redis.Redis.from_url(os.environ["REDIS_URL"]))
    _redis[0].rpush(RECORDS, json.dumps(_current))
    _current.clear()


@app.task(name="bench.empty", ignore_result=True)
def empty(sent: float) -> None:
    """Nothing: the baseline's round trip is the broker, the pick-up and the pool's hand-over."""
    _task_state()[0]["sent"] = sent


def records(client) -> list[dict]:
    """Every record pushed so far, and the list emptied."""
    with client.pipeline() as pipe:
        pipe.lrange(RECORDS, 0, -1)
        pipe.delete(RECORDS)
        raw, _ = pipe.execute()
    return [json.loads(item) for item in raw]


if __name__ == "__main__":
    from celery.__main__ import main

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(main())
