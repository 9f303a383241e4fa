"""Fast-loop latency: from an incident's ingest response to its group's proposal being stored.

Everything is real except the LLM: uvicorn serves the API (the README's production command;
``--web-server gunicorn`` for sync workers), the fast Celery worker of the same command
(prefork, 4 processes) takes the tasks from Redis, PostgreSQL stores everything, and our OpenAI-compatible loopback server
answers instantly through the real ``openai`` client.

    python benchmarks/fast_loop.py [--incidents 500] [--groups 100] [--rate 100]

Prints p50/p99 over all incidents (an incident whose group already had its proposal counts as
0 ms: it was more evidence, not a new synthesis), p50/p99 over the first incident of each group
(the true synthesis latency, which the target is judged on), and the number of LLM calls, which
must equal the number of groups. Target: p50 ≤ 300 ms. Uses its own database (dropped,
created and migrated at each start) and Redis db 1 unless told otherwise; "proposal stored" is the
revision's ``created_at``, taken inside the transaction that stores it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from _harness import ROOT, ensure_database, free_port

VERBS = [
    "search",
    "fetch",
    "update",
    "create",
    "delete",
    "list",
    "export",
    "import",
    "sync",
    "send",
]
NOUNS = ["orders", "invoices", "tickets", "users", "refunds", "shipments", "reports", "charts",
         "contracts", "payments"]  # fmt: skip
ERRORS = [
    ("ToolArgumentError", "invalid value '{v}' for '{arg}' (expected ISO 8601 date)"),
    ("PermissionError", "caller lacks scope '{arg}' for this operation"),
    ("QueryTimeout", "query exceeded 30000 ms while reading '{arg}'"),
    ("SchemaError", "unknown column '{arg}' in result set"),
    ("RateLimited", "upstream throttled requests for '{arg}'"),
]
ARGS = ["since", "region", "owner", "status", "currency", "limit", "cursor", "locale", "tier", "tz"]


def _payload(group: int, n: int) -> dict:
    verb, noun = VERBS[group % 10], NOUNS[(group // 10) % 10]
    error_type, template = ERRORS[group % len(ERRORS)]
    arg = ARGS[(group * 7) % 10]
    tool = f"{verb}_{noun}"
    return {
        "id": f"bench-{group}-{n}-{secrets.token_hex(4)}",
        "agent": {"name": f"agent-{group % 4}", "version": "1.0"},
        "kind": "tool_error",
        "severity": "high",
        "error": {
            "type": error_type,
            "message": f"{tool}: " + template.format(v=f"value {n}", arg=f"{arg}_{group}"),
            "tool": tool,
        },
        "messages": [
            {"role": "user", "content": f"Please {verb} my {noun} (request {n})."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{n}",
                        "type": "function",
                        "function": {"name": tool, "arguments": json.dumps({arg: f"v{n}"})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{n}", "content": f"error: bad {arg}"},
        ],
        "feedback": {"text": f"The {noun} request failed.", "score": 1},
    }


def _answer_factory(calls=None):
    counter = iter(range(1, 10**9))
    lock = threading.Lock()

    def answer(body: dict):
        from tests.fakes.openai_server import Reply

        with lock:
            n = next(counter)
            if calls is not None:
                with calls.get_lock():
                    calls.value += 1
        return Reply(
            content=json.dumps(
                {
                    "diagnosis": "The agent passed an argument the tool does not accept.",
                    "decision": "new_skill",
                    "skill": {
                        "slug": f"bench-skill-{n}",
                        "name": f"Benchmark skill {n}",
                        "description": f"When situation number {n} arises in the benchmark.",
                        "instructions": f"Do step {n} before calling the tool; never skip it.",
                        "category": "common_mistakes",
                    },
                }
            ),
            usage={"prompt_tokens": 800, "completion_tokens": 90, "total_tokens": 890},
        )

    return answer


def _serve_llm(port_out, calls, stop) -> None:
    """The loopback LLM in its own process, so the load generator's threads never slow its
    answers down (they would share one GIL)."""
    from tests.fakes.openai_server import OpenAIServer

    server = OpenAIServer(default=_answer_factory(calls), model="loopback-instant").start()
    port_out.value = server.port
    stop.wait()
    server.stop()


def start_llm(env: dict[str, str]):
    """Start the loopback LLM in a process of its own and point ``env`` at it. Returns the
    process, its shared count of chat calls and the event that stops it."""
    context = multiprocessing.get_context("fork")
    port, calls, stop = context.Value("i", 0), context.Value("i", 0), context.Event()
    process = context.Process(target=_serve_llm, args=(port, calls, stop), daemon=True)
    process.start()
    while not port.value:
        time.sleep(0.05)
    env.update(
        OPENAI_BASE_URL=f"http://127.0.0.1:{port.value}/v1",
        OPENAI_API_KEY="bench",
        METACLAW_LLM_MODEL="loopback-instant",
    )
    return process, calls, stop


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=500)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100.0, help="incidents per second sent")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=4,
        help="the fast worker's processes (4: the README's production command)",
    )
    parser.add_argument("--worker-pool", default="prefork", choices=["prefork", "threads", "solo"])
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument(
        "--web-server",
        default="uvicorn",
        choices=["uvicorn", "gunicorn"],
        help="uvicorn: the README's production command (ASGI, the ingestion fast lane); "
        "gunicorn: sync workers (WSGI, the whole Django stack)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/metaclaw_bench_fast_loop"
        ),
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    )
    args = parser.parse_args()

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "metaclaw_site.settings",
        "DATABASE_URL": args.database_url,
        "REDIS_URL": args.redis_url,
        "SECRET_KEY": secrets.token_urlsafe(32),
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "METACLAW_OUTBOX_SWEEP_AFTER_SECONDS": "3600",
        "LOG_LEVEL": "WARNING",
        "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
    }
    os.environ.update(env)
    # A fresh database each run: the machines here run PostgreSQL without autovacuum, so the
    # tables of earlier runs would never be analysed, and their plans (a join over every
    # earlier run's revisions) were measured instead of the fast loop.
    ensure_database(env, fresh=True)

    import django

    django.setup()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()

    from base import services
    from incidents.models import IncidentGroup
    from metaclaw_site.projects import project_create
    from skills.library.models import SkillRevision

    run = secrets.token_hex(3)
    project = project_create(name=f"Fast-loop bench {run}", slug=f"bench-{run}")
    warm_project = project_create(name=f"Warm-up {run}", slug=f"warm-{run}")
    key = services.api_key_create(project=project, name="bench", scopes=["ingest"]).secret
    warm_key = services.api_key_create(project=warm_project, name="warm", scopes=["ingest"]).secret

    llm, llm_calls, llm_stop = start_llm(env)
    web_port = free_port()
    if args.web_server == "uvicorn":
        web_command = [
            sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application",
            "--host", "127.0.0.1", "--port", str(web_port), "--workers", str(args.web_workers),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    else:
        web_command = [
            sys.executable, "-m", "gunicorn", "metaclaw_site.wsgi:application",
            "-w", str(args.web_workers), "-b", f"127.0.0.1:{web_port}", "--log-level", "warning",
        ]  # fmt: skip
    processes = [
        subprocess.Popen(web_command, cwd=ROOT, env=env),
        subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "metaclaw_site", "worker", "-Q", "fast",
                "-P", args.worker_pool, "-c", str(args.worker_concurrency), "--without-gossip",
                "--without-mingle", "--without-heartbeat",
                "-l", os.environ.get("BENCH_WORKER_LOG", "WARNING"),
            ],
            cwd=ROOT, env=env,
        ),
    ]  # fmt: skip
    base = f"http://127.0.0.1:{web_port}/api/v1"

    def post(payload: dict, api_key: str) -> tuple[float, int]:
        request = urllib.request.Request(
            f"{base}/incidents",
            data=json.dumps(payload).encode(),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
            return time.time(), body["group_id"]

    def wait_for_proposals(group_ids: set[int], timeout: float) -> dict[int, float]:
        deadline = time.monotonic() + timeout
        stored: dict[int, float] = {}
        while time.monotonic() < deadline:
            rows = SkillRevision.objects.filter(source_groups__in=group_ids).values_list(
                "source_groups", "created_at"
            )
            for group_id, created_at in rows:
                at = created_at.timestamp()
                stored[group_id] = min(stored.get(group_id, at), at)
            if len(stored) >= len(group_ids):
                return stored
            time.sleep(0.1)
        return stored

    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        # Warm up every worker process (imports, the embedding model, DB connections).
        warm_groups = {
            post(_payload(1000 + i, 0), warm_key)[1] for i in range(args.worker_concurrency * 3)
        }
        if len(wait_for_proposals(warm_groups, 120)) < len(warm_groups):
            print("Warm-up did not finish; is the worker running?", file=sys.stderr)
            return 2
        warm_calls = llm_calls.value

        incidents = [
            (g, n) for g in range(args.groups) for n in range(args.incidents // args.groups)
        ]
        random.Random(7).shuffle(incidents)
        interval = 1.0 / args.rate
        started = time.time()
        results: list[tuple[int, float, int]] = []
        lock = threading.Lock()

        def send(index: int) -> None:
            group, n = incidents[index]
            target = started + index * interval
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
            answered_at, group_id = post(_payload(group, n), key)
            with lock:
                results.append((group, answered_at, group_id))

        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            list(pool.map(send, range(len(incidents))))
        sent_in = time.time() - started

        group_ids = {group_id for _, _, group_id in results}
        stored = wait_for_proposals(group_ids, 180)
        calls = llm_calls.value - warm_calls
        missing = group_ids - set(stored)

        per_incident = [
            max(0.0, stored[gid] - answered) * 1000 for _, answered, gid in results if gid in stored
        ]
        first: dict[int, float] = {}
        for _, answered, gid in results:
            first[gid] = min(first.get(gid, answered), answered)
        per_group = [(stored[gid] - at) * 1000 for gid, at in first.items() if gid in stored]
        groups_db = IncidentGroup.objects.filter(project=project).count()

        print(f"fast loop benchmark: {len(results)} incidents in {groups_db} groups, sent in "
              f"{sent_in:.1f} s ({len(results) / sent_in:.0f}/s, {args.clients} clients); "
              f"{args.web_server} x{args.web_workers}, "
              f"celery {args.worker_pool} x{args.worker_concurrency}, "
              "Redis broker, PostgreSQL, loopback LLM answering instantly")  # fmt: skip
        print(f"ingest response -> proposal stored, all incidents: "
              f"p50 {statistics.median(per_incident):.0f} ms, "
              f"p99 {_percentile(per_incident, 99):.0f} ms")  # fmt: skip
        print(f"ingest response -> proposal stored, first incident of each group: "
              f"p50 {statistics.median(per_group):.0f} ms, "
              f"p99 {_percentile(per_group, 99):.0f} ms, max {max(per_group):.0f} ms")  # fmt: skip
        print(f"LLM calls: {calls} for {len(group_ids)} groups "
              f"({'equal' if calls == len(group_ids) else 'NOT EQUAL'}); "
              f"proposals missing: {len(missing)}")  # fmt: skip
        ok = calls == len(group_ids) and not missing
        honest = statistics.median(per_group)
        print(
            "target p50 <= 300 ms (judged on the first incident of each group, the one that "
            f"waits for a synthesis): {'met' if honest <= 300 else 'MISSED'}"
        )
        return 0 if ok else 1
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        llm_stop.set()
        llm.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
