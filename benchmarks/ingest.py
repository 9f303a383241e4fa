#!/usr/bin/env python
"""Ingestion throughput and latency under a production server.

Runs MetaClaw under the README's production command (uvicorn, one worker per core; or
gunicorn with ``--server sync|gthread``) on PostgreSQL + Redis (a database of its own,
``metaclaw_bench``) and drives it over HTTP with concurrent keep-alive clients. Prints
incidents/s and p50/p99 latency for the single and the batch endpoint, in ``--repeats`` rounds
(each round's figures, then their median and spread), each round beside a baseline measured
on the same server with the same clients: ``GET /livez``, a request that does no work.

    python benchmarks/ingest.py [--server uvicorn] [--workers N] [--clients 16] [--duration 10]
                                [--door fast|django|both] [--group-commit on|off|both]
                                [--sizes 10k,1M] [--repeats 3] [--partitioned]

``--sizes``: the figures are printed with the project already holding each of these numbers of
incidents (copied inside PostgreSQL, ``_growth.py``), so that the cost of a bigger table shows;
``--sizes 0`` measures on an empty one. ``--partitioned``: the incidents table partitioned by month
once the first size is stored (``manage.py partition_incidents``, ``incidents.partitions``), as at
hundreds of millions; the conversion's time is printed.

``--door`` picks what serves the routes under uvicorn: the ASGI fast lane (the default, as in
production), Django's own async stack (``METACLAW_FAST_LANE=0``), or both one after the other on
the same database, for an A/B of what the fast lane still buys. ``--group-commit`` does the same
for the fast lane's group commit (``base.coalescing``: single incidents that arrive while another
of their key is being stored share the next transaction): on (the default, as in production),
off (``METACLAW_INGEST_GROUP_COMMIT_MAX_ITEMS=1``: each request its own transaction), or both.

Targets on a 2-core machine: single ≥ 500 incidents/s with p99 ≤ 50 ms at 16 clients;
batch ≥ 5,000 incidents/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid

from _growth import grow_incidents, parse_sizes
from _harness import Server, build_request, django_ready, free_port, run_load


def setup_project() -> str:
    """A new ingest key of the benchmark project (made if missing). Django must be set up."""
    from base import services
    from base.models import Project
    from metaclaw_site.projects import project_create

    project = Project.objects.filter(slug="bench").first() or project_create(
        name="Bench", slug="bench"
    )
    return services.api_key_create(project=project, name="bench", scopes=["ingest"]).secret


def incident(client_id: str, n: int) -> dict:
    return {
        "id": client_id,
        "agent": {"name": f"agent-{n % 4}", "version": "1.0"},
        "kind": ["tool_error", "wrong_answer", "timeout", "user_complaint"][n % 4],
        "severity": "high",
        "error": {"type": f"Error{n % 25}", "message": f"search_orders: invalid value 'x{n}' (request {n})"},
        "messages": [
            {"role": "user", "content": "Where is my order from last week?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{n}", "type": "function",
                 "function": {"name": "search_orders", "arguments": '{"since": "last week"}'}}]},
            {"role": "tool", "tool_call_id": f"call_{n}", "content": "error: bad date"},
        ],
        "feedback": {"text": "failed", "score": 1},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--workers", type=int, default=None, help="default: one per core (uvicorn), 4 (gunicorn)"
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-clients", type=int, default=4)
    parser.add_argument(
        "--server", choices=["gthread", "sync", "uvicorn"], default="uvicorn",
        help="uvicorn (default: the README's production command, --loop uvloop --http "
        "httptools), gunicorn sync workers (requests spread evenly over the processes), or "
        "gunicorn gthread (keep-alive connections stick to one process)",
    )  # fmt: skip
    parser.add_argument("--door", choices=["fast", "django", "both"], default="fast")
    parser.add_argument("--group-commit", choices=["on", "off", "both"], default="on")
    parser.add_argument("--partitioned", action="store_true", help="partition incidents first")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds at each size (median and spread printed)"
    )
    parser.add_argument(
        "--sizes",
        default="10k,1M",
        help="incidents stored before each measurement (default 10k,1M)",
    )
    args = parser.parse_args()
    if args.workers is None:
        args.workers = (os.cpu_count() or 2) if args.server == "uvicorn" else 4

    env = django_ready("metaclaw_bench", redis_db=9, fresh=True)
    key = setup_project()
    run_id = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    doors = ["fast", "django"] if args.door == "both" else [args.door]
    group_commits = ["on", "off"] if args.group_commit == "both" else [args.group_commit]
    # (door, group commit on the fast lane): Django's door has none.
    variants = [(d, g) for d in doors for g in (group_commits if d == "fast" else [""])]
    summary: list[tuple[int, str, dict]] = []
    for size in parse_sizes(args.sizes):
        if size:
            print(f"\n== with {size:,} incidents stored ==", flush=True)
            preload(size)
        if args.partitioned:
            partition()
        for door, group_commit in variants:
            port = free_port()
            if args.server == "uvicorn":
                command = [
                    sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application", "--host", "127.0.0.1",
                    "--port", str(port), "--workers", str(args.workers), "--no-access-log",
                    "--log-level", "warning", "--loop", "uvloop", "--http", "httptools",
                ]  # fmt: skip
            else:
                command = [
                    sys.executable, "-m", "gunicorn", "metaclaw_site.wsgi:application",
                    "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers),
                    "--worker-class", args.server, "--log-level", "warning", "--preload",
                ] + (["--threads", "4", "--keep-alive", "30"] if args.server == "gthread" else [])  # fmt: skip
            # The door is read at boot (metaclaw_site/asgi.py); the WSGI servers have only Django's.
            env["METACLAW_FAST_LANE"] = "1" if door == "fast" else "0"
            env["METACLAW_INGEST_GROUP_COMMIT_MAX_ITEMS"] = "1" if group_commit == "off" else "100"
            label = f"{door} door" + (f", group commit {group_commit}" if group_commit else "")
            figures = _measure(
                args, command, env, port, headers, f"{run_id}-{size}-{door}{group_commit}",
                label=label,
            )  # fmt: skip
            summary.append((size, label, figures))
    if len(summary) > 1:
        print("\ngrowth (the same load at each size; flat is what the issue asks for):")
        for size, label, figures in summary:
            print(
                f"  {size:>10,} incidents stored, {label}: single {figures['single_rps']:6.0f}/s "
                f"p99 {figures['single_p99']:5.1f} ms; batch {figures['batch_rps']:7.0f}/s "
                f"(medians; baseline GET /livez {figures['base_rps']:.0f}/s)"
            )


def partition() -> None:
    """The incidents table partitioned by month, as it is now (done once; then it is only
    checked), with the conversion's time."""
    from incidents.partitions import incidents_partition

    started = time.perf_counter()
    done = incidents_partition()
    if done["converted"]:
        print(
            f"  partitioned by month in {time.perf_counter() - started:.1f} s, its "
            f"{done['rows']:,} incidents kept in place: {', '.join(done['made'])}",
            flush=True,
        )


def preload(size: int) -> None:
    """Bring the benchmark project to ``size`` stored incidents: 1,000 through the ingest
    service (real groups and fingerprints), the rest copies of them (``grow_incidents``)."""
    from base.models import Project
    from incidents.ingest import incidents_ingest
    from incidents.models import Incident
    from incidents.schemas import IncidentIn

    project = Project.objects.get(slug="bench")
    have = Incident.objects.filter(project=project).count()
    if have < min(size, 1_000):
        seed = [IncidentIn(**incident(f"preload-{n}", n)) for n in range(min(size, 1_000) - have)]
        for start in range(0, len(seed), 500):
            incidents_ingest(project=project, items=seed[start : start + 500])
    if size > 1_000:
        seconds = grow_incidents(project.pk, size)
        print(f"  grew to {size:,} incidents in {seconds:.1f} s", flush=True)


def _spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """The median and, in brackets, every run's figure: the machine's noise stays visible."""
    return f"{fmt.format(statistics.median(values))} ({', '.join(fmt.format(v) for v in values)})"


def _measure(args, command, env, port, headers, run_id, *, label: str) -> dict[str, float]:
    print(
        f"server: {args.server}, {args.workers} workers, {label}; PostgreSQL + Redis; "
        f"{os.cpu_count()} cores; {args.repeats} rounds of: baseline, single, batch"
    )
    runs: dict[str, list[float]] = {k: [] for k in (
        "base_rps", "base_p99", "single_rps", "single_p50", "single_p99", "batch_rps")}  # fmt: skip
    with Server(command, env, port):

        def empty(worker: int, i: int) -> bytes:
            # The baseline: the same server and clients, a request that does no work (liveness,
            # answered before Django). A slower machine moves it with the figures.
            return build_request("GET", "/livez", b"", {})

        # One serialised batch with a placeholder in every client id: a request is then a
        # cheap bytes.replace, so the load generator does not steal the server's CPU.
        template = json.dumps(
            {"items": [incident(f"{run_id}-b-@@-{j}", j) for j in range(args.batch_size)]}
        ).encode()

        for round_ in range(args.repeats):

            def single(worker: int, i: int, round_: int = round_) -> bytes:
                n = worker * 1_000_000 + i
                body = json.dumps(incident(f"{run_id}-s{round_}-{worker}-{i}", n)).encode()
                return build_request("POST", "/api/v1/incidents", body, headers)

            def batch(worker: int, i: int, round_: int = round_) -> bytes:
                body = template.replace(b"@@", f"{round_}-{worker}-{i}".encode())
                return build_request("POST", "/api/v1/incidents/batch", body, headers)

            base = asyncio.run(
                run_load(port, empty, concurrency=args.clients, duration=args.duration / 2)
            )
            result = asyncio.run(
                run_load(port, single, concurrency=args.clients, duration=args.duration, warmup=3)
            )
            print(
                f"round {round_ + 1}: single  /api/v1/incidents        clients={args.clients:>3}  "
                f"{result.rps:8.0f} incidents/s  p50={result.p50:6.1f} ms  "
                f"p99={result.pct(99):6.1f} ms  statuses={result.statuses}   baseline GET /livez: "
                f"{base.rps:.0f}/s p99 {base.pct(99):.1f} ms"
            )
            runs["base_rps"].append(base.rps)
            runs["base_p99"].append(base.pct(99))
            runs["single_rps"].append(result.rps)
            runs["single_p50"].append(result.p50)
            runs["single_p99"].append(result.pct(99))
            result = asyncio.run(
                run_load(port, batch, concurrency=args.batch_clients, duration=args.duration)
            )
            print(
                f"round {round_ + 1}: batch   /api/v1/incidents/batch  "
                f"clients={args.batch_clients:>3}  {result.rps * args.batch_size:8.0f} "
                f"incidents/s  ({result.rps:.1f} batches/s of {args.batch_size})  "
                f"p50={result.p50:6.1f} ms  p99={result.pct(99):6.1f} ms  "
                f"statuses={result.statuses}"
            )
            runs["batch_rps"].append(result.rps * args.batch_size)
    figures = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"single: {_spread(runs['single_rps'])} incidents/s, p50 "
        f"{_spread(runs['single_p50'], '{:.1f}')} ms, p99 {_spread(runs['single_p99'], '{:.1f}')} "
        f"ms (target >= 500/s, p99 <= 50 ms); baseline GET /livez {_spread(runs['base_rps'])}/s, "
        f"p99 {_spread(runs['base_p99'], '{:.1f}')} ms"
    )
    print(f"batch: {_spread(runs['batch_rps'])} incidents/s (target >= 5,000/s)")
    return figures


if __name__ == "__main__":
    main()
