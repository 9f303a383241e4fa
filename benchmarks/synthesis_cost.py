"""What one fast-loop synthesis costs, in process: CPU of this Python process and of its
PostgreSQL backend, and wall time, per ``group_synthesize``.

The fast loop's throughput under a burst of new groups is bound by CPU (web, worker and
PostgreSQL share the cores), so this is the figure behind ``fast_loop.py``'s latency, without
its queueing and without the noise of other processes. The loopback LLM answers instantly from
a process of its own (its CPU is not counted), with the same answers as ``fast_loop.py``.

    python benchmarks/synthesis_cost.py [--groups 100]   # 3 warm up, 97 are measured

Then the provenance count, written out in ``incidents.provenance`` and as the ORM expresses it
(kept here): both must give the same answers, and it prints the Python CPU of each per call.
"""

from __future__ import annotations

import argparse
import cProfile
import secrets
import time
from collections import Counter

from _harness import backend_cpu_clock, bench_env, django_setup, ensure_database
from fast_loop import _payload, start_llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=100, help="3 of them warm up")
    parser.add_argument(
        "--profile", metavar="FILE", help="write cProfile's statistics of the measured syntheses"
    )
    args = parser.parse_args()

    env = bench_env("metaclaw_bench_synthesis", redis_db=9)
    env.update(CELERY_TASK_ALWAYS_EAGER="0", METACLAW_OUTBOX_SWEEP_AFTER_SECONDS="3600")
    _, _, stop = start_llm(env)
    ensure_database(env, fresh=True)
    django_setup(env)

    from django.db import connection

    from incidents import ingest as incident_ingest
    from incidents import signals
    from incidents.schemas import IncidentIn
    from metaclaw_site.projects import project_create
    from skills.library.embeddings import get_embedder
    from skills.synthesis.services import group_synthesize

    signals.groups_await_synthesis.receivers.clear()  # no worker here: this process synthesises
    get_embedder()
    project = project_create(name="Synthesis cost", slug=f"cost-{secrets.token_hex(3)}")
    group_ids = []
    for group in range(args.groups):
        for n in range(2):
            (result,) = incident_ingest.incidents_ingest(
                project=project, items=[IncidentIn(**_payload(group, n))]
            )
        group_ids.append(result.group_id)
    group_ids = list(dict.fromkeys(group_ids))  # fast_loop.py's payloads make 100 groups at most
    for group_id in group_ids[:3]:  # warm-up: imports, the SDK's client, connections
        group_synthesize(group_id=group_id)

    backend_cpu = backend_cpu_clock(connection)
    pg_started, cpu_started, started = backend_cpu(), time.process_time(), time.perf_counter()
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    outcomes = [group_synthesize(group_id=group_id) for group_id in group_ids[3:]]
    wall = time.perf_counter() - started
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, pg = time.process_time() - cpu_started, backend_cpu() - pg_started
    stop.set()

    n = len(outcomes)
    print(
        f"synthesis cost over {n} groups ({dict(Counter(str(o) for o in outcomes))}), loopback LLM: "
        f"Python CPU {cpu / n * 1000:.1f} ms, PostgreSQL backend CPU {pg / n * 1000:.1f} ms, "
        f"wall {wall / n * 1000:.1f} ms per synthesis"
    )
    provenance_sql_against_orm(group_ids)


def _provenance_orm(group_ids: list[int]) -> dict:
    """``incidents.provenance.groups_provenance`` as the ORM expresses it (the service's query
    is written out; this keeps the comparison)."""
    from django.db.models import Case, CharField, Count, Q, Value, When
    from django.db.models.functions import Cast, Concat

    from incidents.models import Incident

    source = Case(
        When(~Q(end_user=""), then=Concat(Value("user:"), "end_user")),
        When(~Q(session_id=""), then=Concat(Value("session:"), "session_id")),
        When(
            api_key_id__isnull=False,
            then=Concat(Value("key:"), Cast("api_key_id", output_field=CharField())),
        ),
        default=Value("unknown"),
        output_field=CharField(),
    )
    counts = Incident.objects.filter(group_id__in=group_ids).aggregate(
        incidents=Count("id"),
        sessions=Count("session_id", distinct=True, filter=~Q(session_id="")),
        end_users=Count("end_user", distinct=True, filter=~Q(end_user="")),
        agents=Count("agent_name", distinct=True),
        api_keys=Count("api_key_id", distinct=True),
        sources=Count(source, distinct=True),
    )
    return {**counts, "single_source": counts["sources"] <= 1}


def provenance_sql_against_orm(group_ids: list[int]) -> None:
    """The provenance count of each group, written out (the service) and through the ORM: the
    same answers (checked), and the Python CPU of each per call, alternating."""
    from incidents.provenance import groups_provenance

    for group_id in group_ids:
        assert groups_provenance([group_id]) == _provenance_orm([group_id]), group_id
    spent = {"written out": 0.0, "ORM": 0.0}
    for _ in range(3):
        for name, count in (("written out", groups_provenance), ("ORM", _provenance_orm)):
            started = time.process_time()
            for group_id in group_ids:
                count([group_id])
            spent[name] += time.process_time() - started
    calls = 3 * len(group_ids)
    print(
        "provenance count per group (the same answers for all "
        f"{len(group_ids)} groups), Python CPU per call: "
        + ", ".join(f"{name} {seconds / calls * 1000:.2f} ms" for name, seconds in spent.items())
    )


if __name__ == "__main__":
    main()
