"""Fast-loop latency: from an incident's ingest response to its group's proposal being stored.

Everything is real except the LLM: uvicorn serves the API (the README's production command;
``--web-server gunicorn`` for sync workers), the fast Celery worker of the same command
(prefork, 4 processes; started through ``_probe.py``, which only adds timers and an empty task)
takes the tasks from Redis, PostgreSQL stores everything, and our OpenAI-compatible loopback
server answers instantly through the real ``openai`` client.

    python benchmarks/fast_loop.py [--incidents 500] [--groups 100] [--rate 100] [--repeats 3]

Each of ``--repeats`` bursts (a project of its own) prints p50/p99 over the first incident of
each group (the true synthesis latency, which the target is judged on) and over all incidents
(one whose group already had its proposal counts as 0 ms: it was more evidence, not a new
synthesis), the number of LLM calls (must equal the number of groups), and beside them the
baseline: an empty Celery task's round trip on the same worker (``bench.empty``, sent → done),
timed just before the burst. Then, over all bursts: each stage of the first synthesis of each
group (ingest response, queue wait from the response to the task's start, then the steps
``_probe.py`` times inside the worker), the CPU that each process spent per synthesis (web,
worker, PostgreSQL backends, the loopback LLM, this load generator), and the bursts' p50s
with their spread. Target: p50 <= 300 ms. Uses its own database (dropped, created and migrated
at each start) and Redis db 1 unless told otherwise (flushed at the start: never share it with a
test run); "proposal stored" is the revision's ``created_at``, taken inside the transaction
that stores it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from _harness import ROOT, ensure_database, free_port, stop

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


def _payload(group: int, n: int, conversation: str = "") -> dict:
    """Incident ``n`` of failure mode ``group``. ``conversation`` goes into what the agent's
    user wrote and the tool call's arguments: text that is new in every real conversation.
    Each burst passes its own, so that no burst finds the PII detector's answers cached by an
    earlier one (the cache is shared, by content, and the error messages still repeat)."""
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
            {"role": "user", "content": f"Please {verb} my {noun} (request {n}{conversation})."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{n}",
                        "type": "function",
                        "function": {
                            "name": tool,
                            "arguments": json.dumps({arg: f"v{n}{conversation}"}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{n}", "content": f"error: bad {arg}"},
        ],
        "feedback": {"text": f"The {noun} request failed.", "score": 1},
    }


def _answer_factory(calls=None, latency: float = 0.0):
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
            delay=latency,
        )

    return answer


def _serve_llm(port_out, calls, stop, latency) -> None:
    """The loopback LLM in its own process, so the load generator's threads never slow its
    answers down (they would share one GIL)."""
    from tests.fakes.openai_server import OpenAIServer

    server = OpenAIServer(default=_answer_factory(calls, latency), model="loopback-instant").start()
    port_out.value = server.port
    stop.wait()
    server.stop()


def start_llm(env: dict[str, str], latency: float = 0.0):
    """Start the loopback LLM in a process of its own and point ``env`` at it; it answers after
    ``latency`` seconds (0: at once). Returns the process, its shared count of chat calls and
    the event that stops it."""
    context = multiprocessing.get_context("fork")
    port, calls, stop = context.Value("i", 0), context.Value("i", 0), context.Event()
    process = context.Process(target=_serve_llm, args=(port, calls, stop, latency), daemon=True)
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


# The steps of a synthesis, as ``_probe.py`` times them, in the order they run. Those before
# "store" are on the path of the measured latency (the proposal is stored in "store"); the
# rest happen after it and only compete for the cores.
PATH_STEPS = ["claim", "merge check", "provenance", "evidence", "similar skills", "prompt",
              "LLM round trip", "store"]  # fmt: skip
AFTER_STEPS = ["notify", "link related"]


class CpuMeter:
    """CPU seconds (user + system) of the benchmark's processes by role, read through psutil:
    the web server and the worker (with their children), the loopback LLM, this load
    generator, and the PostgreSQL backends serving the benchmark's database."""

    def __init__(self, roles: dict[str, list[int]], database: str) -> None:
        self.roles, self.database = roles, database

    def _processes(self, role: str):
        import psutil

        if role == "postgres":
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", [self.database]
                )
                pids = [pid for (pid,) in cursor.fetchall()]
            return [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
        found = []
        for pid in self.roles[role]:
            process = psutil.Process(pid)
            # This process's children are the others: the load generator is itself alone.
            children = [] if pid == os.getpid() else process.children(recursive=True)
            found += [process, *children]
        return found

    def read(self) -> dict[str, dict[int, float]]:
        import psutil

        reading: dict[str, dict[int, float]] = {}
        for role in [*self.roles, "postgres"]:
            reading[role] = {}
            for process in self._processes(role):
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                reading[role][process.pid] = times.user + times.system
        return reading

    @staticmethod
    def spent(before: dict, after: dict) -> dict[str, float]:
        """CPU seconds by role between two readings (a process that started in between
        counts from zero, one that ended is left out)."""
        return {
            role: sum(t - before.get(role, {}).get(pid, 0.0) for pid, t in pids.items())
            for role, pids in after.items()
        }


def _spread(values: list[float]) -> str:
    """Median and range of several repetitions' figures."""
    return f"{statistics.median(values):.0f} ms (runs: {', '.join(f'{v:.0f}' for v in values)})"


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {statistics.median(values):6.1f}  p90 {_percentile(values, 90):6.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--incidents", type=int, default=500)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100.0, help="incidents per second sent")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--repeats", type=int, default=3, help="bursts measured, each afresh")
    parser.add_argument(
        "--baseline-tasks", type=int, default=30, help="empty tasks timed before each burst"
    )
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=4,
        help="each fast worker's processes, or threads with --worker-pool threads (4: the "
        "README's production command)",
    )
    parser.add_argument("--worker-pool", default="prefork", choices=["prefork", "threads", "solo"])
    parser.add_argument(
        "--worker-nodes", type=int, default=1, help="fast worker processes started (each a node)"
    )
    parser.add_argument(
        "--llm-latency",
        type=float,
        default=0.0,
        help="seconds the loopback LLM takes to answer (0: at once; a hosted model takes 1-10 s)",
    )
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
    from _probe import records

    broker = redis.Redis.from_url(args.redis_url)
    broker.flushdb()

    from base import services
    from incidents.models import IncidentGroup
    from metaclaw_site.celery import app as celery_app
    from metaclaw_site.projects import project_create
    from skills.library.models import SkillRevision

    run = secrets.token_hex(3)
    warm_project = project_create(name=f"Warm-up {run}", slug=f"warm-{run}")
    warm_key = services.api_key_create(project=warm_project, name="warm", scopes=["ingest"]).secret

    llm, llm_calls, llm_stop = start_llm(env, args.llm_latency)
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
        # The production worker (or ``--worker-nodes`` of them), with timers on the
        # synthesis's steps and an empty task for the baseline (``_probe.py``).
        *(
            subprocess.Popen(
                [
                    sys.executable, "benchmarks/_probe.py", "-A", "metaclaw_site", "worker",
                    "-Q", "fast", "-P", args.worker_pool, "-c", str(args.worker_concurrency),
                    "-n", f"fast{node}@%h",
                    "--without-gossip", "--without-mingle", "--without-heartbeat",
                    "-l", os.environ.get("BENCH_WORKER_LOG", "WARNING"),
                ],
                cwd=ROOT, env=env,
            )
            for node in range(args.worker_nodes)
        ),
    ]  # fmt: skip
    meter = CpuMeter(
        {
            "web": [processes[0].pid],
            "worker": [process.pid for process in processes[1:]],
            "loopback LLM": [llm.pid],
            "load generator": [os.getpid()],
        },
        args.database_url.rsplit("/", 1)[1],
    )

    connections = threading.local()

    def post(payload: dict, api_key: str) -> tuple[float, int, float]:
        """``(answered at, group id, response time in ms)``. One kept-alive connection per
        client thread: the load generator shares the cores it measures, and urllib's new
        connection and opener per request cost it several times more CPU."""
        body = json.dumps(payload).encode()
        headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        for attempt in (1, 2):
            if getattr(connections, "http", None) is None:
                connections.http = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
            sent = time.perf_counter()
            try:
                connections.http.request("POST", "/api/v1/incidents", body, headers)
                response = connections.http.getresponse()
                answer = json.loads(response.read())
            except (http.client.HTTPException, ConnectionError):
                connections.http.close()
                connections.http = None  # the server closed a kept-alive connection: again
                if attempt == 2:
                    raise
                continue
            if response.status != 202:
                raise RuntimeError(f"Ingest answered {response.status}: {answer}")
            return time.time(), answer["group_id"], (time.perf_counter() - sent) * 1000
        raise AssertionError("unreachable")

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

    def empty_task_round_trips(count: int, timeout: float = 30) -> list[float]:
        """``count`` empty tasks, one at a time: sent → finished on the worker, in ms."""
        times = []
        for _ in range(count):
            sent = time.time()
            celery_app.send_task("bench.empty", args=[sent])
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                done = [r for r in records(broker) if r.get("sent") == sent]
                if done:
                    times.append((done[0]["end"] - sent) * 1000)
                    break
                time.sleep(0.002)
        return times

    def burst(project, key: str) -> dict:
        incidents = [
            (g, n) for g in range(args.groups) for n in range(args.incidents // args.groups)
        ]
        random.Random(7).shuffle(incidents)
        conversation = f" in conversation {secrets.token_hex(4)}"
        interval = 1.0 / args.rate
        calls_before = llm_calls.value
        cpu_before = meter.read()
        started = time.time()
        results: list[tuple[int, float, int, float]] = []
        lock = threading.Lock()

        def send(index: int) -> None:
            group, n = incidents[index]
            target = started + index * interval
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
            answered_at, group_id, took = post(_payload(group, n, conversation), key)
            with lock:
                results.append((group, answered_at, group_id, took))

        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            list(pool.map(send, range(len(incidents))))
        sent_in = time.time() - started
        group_ids = {group_id for _, _, group_id, _ in results}
        stored = wait_for_proposals(group_ids, 180)
        drained = time.time() - started
        time.sleep(0.5)  # the work after the last proposal (notify, links) counts too
        cpu = CpuMeter.spent(cpu_before, meter.read())
        first: dict[int, tuple[float, float]] = {}
        for _, answered, gid, took in results:
            if gid not in first or answered < first[gid][0]:
                first[gid] = (answered, took)
        return {
            "results": results,
            "sent_in": sent_in,
            "drained": drained,
            "stored": stored,
            "first": first,
            "calls": llm_calls.value - calls_before,
            "missing": group_ids - set(stored),
            "groups_db": IncidentGroup.objects.filter(project=project).count(),
            "cpu": cpu,
        }

    def stage_breakdown(measured: dict, task_records: list[dict]) -> dict[str, list[float]]:
        """Per group, the stages of the synthesis that proposed (the record with an LLM call):
        ingest response, queue wait (ingest answered → the task starts), each step."""
        proposing = {}
        for record in task_records:
            if (
                record["task"] == "skills.tasks.propose_skill"
                and "LLM round trip" in record["stages"]
            ):
                proposing.setdefault(record["args"][0], record)
        stages: dict[str, list[float]] = {}
        for gid, (answered, took) in measured["first"].items():
            record = proposing.get(gid)
            if record is None or gid not in measured["stored"]:
                continue
            row = {"ingest response": took, "queue wait": (record["start"] - answered) * 1000}
            row.update({s: record["stages"].get(s, 0.0) for s in PATH_STEPS + AFTER_STEPS})
            timed = sum(record["stages"].values())
            row["other (task)"] = (record["end"] - record["start"]) * 1000 - timed
            row["task total"] = (record["end"] - record["start"]) * 1000
            for name, value in row.items():
                stages.setdefault(name, []).append(value)
        return stages

    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        if not empty_task_round_trips(1, timeout=300):  # the worker is up
            print("The worker did not start.", file=sys.stderr)
            return 2
        # Warm up every worker process (imports, the embedding model, DB connections).
        warm_groups = {
            post(_payload(1000 + i, 0, f" in conversation {run}"), warm_key)[1]
            for i in range(args.worker_concurrency * 3)
        }
        if len(wait_for_proposals(warm_groups, 120)) < len(warm_groups):
            print("Warm-up did not finish; is the worker running?", file=sys.stderr)
            return 2
        empty_task_round_trips(
            args.worker_nodes * args.worker_concurrency * 2
        )  # each child ran one
        time.sleep(1)
        records(broker)

        print(f"fast loop benchmark: {args.repeats} bursts of {args.incidents} incidents in "
              f"{args.groups} groups at {args.rate:.0f}/s ({args.clients} clients); "
              f"{args.web_server} x{args.web_workers}, "
              f"celery {args.worker_nodes} x {args.worker_pool} x{args.worker_concurrency}, "
              "Redis broker, "
              "PostgreSQL, loopback LLM answering "
              f"{f'after {args.llm_latency:g} s' if args.llm_latency else 'instantly'}")  # fmt: skip
        firsts_p50, firsts_p99, baselines, ok = [], [], [], True
        all_stages: dict[str, list[float]] = {}
        cpu_totals: dict[str, float] = {}
        syntheses = incidents_sent = 0
        for repeat in range(1, args.repeats + 1):
            project = project_create(name=f"Fast-loop bench {run} #{repeat}",
                                     slug=f"bench-{run}-{repeat}")  # fmt: skip
            key = services.api_key_create(project=project, name="bench", scopes=["ingest"]).secret
            baseline = empty_task_round_trips(args.baseline_tasks)
            records(broker)
            measured = burst(project, key)
            time.sleep(0.5)
            stages = stage_breakdown(measured, records(broker))
            for name, values in stages.items():
                all_stages.setdefault(name, []).extend(values)
            for role, seconds in measured["cpu"].items():
                cpu_totals[role] = cpu_totals.get(role, 0.0) + seconds
            syntheses += len(measured["stored"])
            incidents_sent += len(measured["results"])

            stored, results = measured["stored"], measured["results"]
            per_incident = [max(0.0, stored[gid] - answered) * 1000
                            for _, answered, gid, _ in results if gid in stored]  # fmt: skip
            per_group = [(stored[gid] - at) * 1000
                         for gid, (at, _) in measured["first"].items() if gid in stored]  # fmt: skip
            firsts_p50.append(statistics.median(per_group))
            firsts_p99.append(_percentile(per_group, 99))
            baselines.append(statistics.median(baseline))
            groups = len(measured["first"])
            equal = measured["calls"] == groups
            ok = ok and equal and not measured["missing"]
            cores = sum(measured["cpu"].values()) / measured["drained"]
            print(f"run {repeat}: {len(results)} incidents in {measured['groups_db']} groups, "
                  f"sent in {measured['sent_in']:.1f} s "
                  f"({len(results) / measured['sent_in']:.0f}/s), all proposals stored "
                  f"{measured['drained']:.1f} s after the first was sent, using {cores:.2f} "
                  f"cores on average")  # fmt: skip
            print(f"  ingest response -> proposal stored, first incident of each group: "
                  f"p50 {firsts_p50[-1]:.0f} ms, p99 {firsts_p99[-1]:.0f} ms, "
                  f"max {max(per_group):.0f} ms; all incidents: "
                  f"p50 {statistics.median(per_incident):.0f} ms, "
                  f"p99 {_percentile(per_incident, 99):.0f} ms")  # fmt: skip
            print(f"  baseline, an empty task's round trip on the same worker (sent -> done): "
                  f"p50 {statistics.median(baseline):.1f} ms, "
                  f"p99 {_percentile(baseline, 99):.1f} ms; ratio of the p50s "
                  f"{firsts_p50[-1] / statistics.median(baseline):.0f}x")  # fmt: skip
            print(f"  LLM calls: {measured['calls']} for {groups} groups "
                  f"({'equal' if equal else 'NOT EQUAL'}); "
                  f"proposals missing: {len(measured['missing'])}")  # fmt: skip

        print(f"\nper stage, first synthesis of each group, all runs (ms; {syntheses} "
              "syntheses):")  # fmt: skip
        for name in ["ingest response", "queue wait", *PATH_STEPS, "other (task)",
                     *AFTER_STEPS, "task total"]:  # fmt: skip
            after = " (after the proposal is stored)" if name in AFTER_STEPS else ""
            print(f"  {name:<17} {_summary(all_stages.get(name, []))}{after}")
        total = sum(cpu_totals.values())
        print(f"CPU per incident, all processes: {total / max(1, incidents_sent) * 1000:.1f} ms "
              "(each group's synthesis counted in its incidents); by process, per synthesis: "
              + ", ".join(f"{role} {seconds / max(1, syntheses) * 1000:.1f} ms"
                          for role, seconds in cpu_totals.items()))  # fmt: skip
        print(f"first incident of each group, p50 over {args.repeats} runs: "
              f"{_spread(firsts_p50)}; p99: {_spread(firsts_p99)}; "
              f"empty-task baseline p50: {_spread(baselines)}")  # fmt: skip
        honest = statistics.median(firsts_p50)
        print(
            "target p50 <= 300 ms (judged on the first incident of each group, the one that "
            f"waits for a synthesis; median of the runs): {'met' if honest <= 300 else 'MISSED'}"
        )
        return 0 if ok else 1
    finally:
        for process in processes:
            stop(process, timeout=20)
        llm_stop.set()
        llm.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
