"""A fresh worker's first proposal: what a restart (a deploy, a crash) adds to it.

Starts the production fast worker (prefork, one child; through ``_probe.py``, which only adds
timers), lets it report ready, then ingests new failure modes one at a time and waits for each
one's proposal, so that every synthesis runs alone on the same child. Prints the first task's
time (the fresh child) beside the median of the later ones (the same child, warm: the baseline
of the same run), with the steps that differ most, for ``--repeats`` fresh workers and their
spread. The loopback LLM answers at once; PostgreSQL and Redis as in ``fast_loop.py``.

    python benchmarks/worker_start.py [--repeats 3] [--groups 6]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time

from _harness import ROOT, bench_env, django_setup, ensure_database, stop
from fast_loop import _payload, start_llm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh workers started")
    parser.add_argument("--groups", type=int, default=6, help="proposals asked of each")
    args = parser.parse_args()

    env = bench_env("metaclaw_bench_worker_start", redis_db=7)
    env.update(CELERY_TASK_ALWAYS_EAGER="0", METACLAW_OUTBOX_SWEEP_AFTER_SECONDS="3600")
    _, _, llm_stop = start_llm(env)
    ensure_database(env, fresh=True)
    os.environ.update(env)
    django_setup(env)

    import redis
    from _probe import records

    from incidents import ingest as incident_ingest
    from incidents.schemas import IncidentIn
    from metaclaw_site.projects import project_create

    broker = redis.Redis.from_url(env["REDIS_URL"])
    project = project_create(name="Worker start", slug=f"start-{secrets.token_hex(3)}")
    firsts, warms, steps = [], [], {}
    group = 0
    try:
        for repeat in range(1, args.repeats + 1):
            broker.flushdb()
            log = open(f"/tmp/metaclaw-worker-start-{os.getpid()}.log", "w")  # noqa: SIM115
            worker = subprocess.Popen(
                [sys.executable, "benchmarks/_probe.py", "-A", "metaclaw_site", "worker",
                 "-Q", "fast", "-P", "prefork", "-c", "1", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 120
                while " ready." not in open(log.name).read():
                    if time.monotonic() > deadline or worker.poll() is not None:
                        print("The worker did not start.", file=sys.stderr)
                        return 2
                    time.sleep(0.1)
                time.sleep(
                    1.0
                )  # the child's own start, which the worker's "ready" does not wait for
                tasks = []
                for _ in range(args.groups):
                    group += 1
                    payload = _payload(group, 0, f" in conversation {secrets.token_hex(4)}")
                    incident_ingest.incidents_ingest(project=project, items=[IncidentIn(**payload)])
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        done = [r for r in records(broker)
                                if r["task"] == "skills.tasks.propose_skill"]  # fmt: skip
                        if done:
                            tasks.extend(done)
                            break
                        time.sleep(0.02)
            finally:
                stop(worker, timeout=20)
                log.close()
                os.unlink(log.name)
            times = [(r["end"] - r["start"]) * 1000 for r in tasks]
            first, warm = times[0], statistics.median(times[1:])
            firsts.append(first)
            warms.append(warm)
            for name, value in tasks[0]["stages"].items():
                later = statistics.median(r["stages"].get(name, 0.0) for r in tasks[1:])
                steps.setdefault(name, []).append(value - later)
            print(f"worker {repeat}: first proposal {first:.0f} ms; the next "
                  f"{len(times) - 1} on the same child: median {warm:.0f} ms "
                  f"({', '.join(f'{t:.0f}' for t in times[1:])})")  # fmt: skip
    finally:
        llm_stop.set()

    print(f"first proposal of a fresh worker: median {statistics.median(firsts):.0f} ms "
          f"(runs: {', '.join(f'{t:.0f}' for t in firsts)}); baseline, later proposals on the "
          f"same child: median {statistics.median(warms):.0f} ms "
          f"(runs: {', '.join(f'{t:.0f}' for t in warms)})")  # fmt: skip
    extra = sorted(steps.items(), key=lambda item: -statistics.median(item[1]))
    print(
        "what the first proposal spends more, by step (median over the runs, ms): "
        + ", ".join(f"{name} {statistics.median(values):+.0f}" for name, values in extra)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
