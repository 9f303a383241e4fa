"""What one fast-loop synthesis costs, in process: CPU of this Python process and of its
PostgreSQL backend, and wall time, per ``group_synthesize``.

The fast loop's throughput under a burst of new groups is bound by CPU (web, worker and
PostgreSQL share the cores), so this is the figure behind ``fast_loop.py``'s latency, without
its queueing and without the noise of other processes. The loopback LLM answers instantly from
a process of its own (its CPU is not counted), with the same answers as ``fast_loop.py``.

    python benchmarks/synthesis_cost.py [--groups 100]   # 3 warm up, 97 are measured

Then each written-out query of the synthesis path (the provenance count, the claim, the outcome,
whether anyone is to be notified) against the ORM's expression of it, kept here: both must give
the same answers and leave the same rows, and it prints the Python CPU of each per call.
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
    # New text in each run: the PII detector's shared cache must not answer for an earlier one.
    conversation = f" in conversation {secrets.token_hex(4)}"
    group_ids = []
    for group in range(args.groups):
        for n in range(2):
            (result,) = incident_ingest.incidents_ingest(
                project=project, items=[IncidentIn(**_payload(group, n, conversation))]
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
    written_out_against_orm(group_ids)


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


def _claim_orm(group_id: int):
    """``incidents.services.group_synthesis_claim`` as the ORM expresses it: an update, then a
    read of what it claimed."""
    from django.db.models import F, Q
    from django.utils import timezone

    from incidents.models import IncidentGroup, SynthesisStatus
    from incidents.services import CLAIM_CLOCK_LEEWAY

    now = timezone.now()
    claimed = IncidentGroup.objects.filter(
        Q(synthesis_requested_at__isnull=True)
        | Q(synthesis_requested_at__lte=now + CLAIM_CLOCK_LEEWAY),
        pk=group_id,
        synthesis_status=SynthesisStatus.WAITING,
    ).update(
        synthesis_status=SynthesisStatus.RUNNING,
        synthesis_attempts=F("synthesis_attempts") + 1,
        synthesis_claimed_at=now,
    )
    return IncidentGroup.objects.get(pk=group_id) if claimed else None


def _finish_orm(group_id: int) -> bool:
    """``incidents.services.group_synthesis_finish`` (RUNNING → PROPOSED) through the ORM."""
    from django.db import transaction
    from django.db.models import F

    from incidents.models import Incident, IncidentGroup, IncidentStatus, SynthesisStatus

    with transaction.atomic(savepoint=False):
        if (
            IncidentGroup.objects.filter(
                pk=group_id, synthesis_status=SynthesisStatus.RUNNING
            ).update(
                synthesis_status=SynthesisStatus.PROPOSED,
                synthesis_error="",
                events_at_synthesis=F("event_count"),
            )
            != 1
        ):
            return False
        Incident.objects.filter(
            group_id=group_id, status__in=[IncidentStatus.NEW, IncidentStatus.ANALYZING]
        ).update(status=IncidentStatus.PROPOSED)
    return True


def _anyone_to_notify_orm(revision) -> bool:
    """``skills.approvals.notifications._anyone_to_notify`` through the ORM: the project's
    channels, then whether a member who may decide has an address."""
    from django.conf import settings

    from base.models import Membership, Project, Role
    from skills.approvals.links import REQUIRED_ROLE, ROLES_AT_LEAST
    from skills.approvals.notifications import _actions_for, mail_configured

    if settings.SLACK_WEBHOOK_URL:
        return True
    project = Project.objects.only("slack_webhook_url", "webhook_url", "notify_emails").get(
        pk=revision.skill.project_id
    )
    roles = ROLES_AT_LEAST[Role(REQUIRED_ROLE[_actions_for(revision)[0]])]
    member = (
        Membership.objects.filter(project_id=project.pk, role__in=[r.value for r in roles])
        .exclude(user__email="")
        .exists()
    )
    mail = mail_configured() and (project.notify_emails.strip() or member)
    return bool(project.slack_webhook_url.strip() or project.webhook_url.strip() or mail)


def _group_state(group_id: int) -> tuple:
    from incidents.models import Incident, IncidentGroup

    group = IncidentGroup.objects.get(pk=group_id)
    statuses = sorted(Incident.objects.filter(group_id=group_id).values_list("status", flat=True))
    return (
        group.synthesis_status,
        group.synthesis_attempts,
        group.events_at_synthesis == group.event_count,
        statuses,
    )


def _group_reset(group_id: int, attempts: int) -> None:
    """Back to WAITING with its incidents NEW, as an ingest leaves a new group."""
    from incidents.models import Incident, IncidentGroup, IncidentStatus, SynthesisStatus

    IncidentGroup.objects.filter(pk=group_id).update(
        synthesis_status=SynthesisStatus.WAITING,
        synthesis_requested_at=None,
        synthesis_attempts=attempts,
        events_at_synthesis=0,
    )
    Incident.objects.filter(group_id=group_id).update(status=IncidentStatus.NEW)


def written_out_against_orm(group_ids: list[int]) -> None:
    """Each written-out query of the synthesis path against the ORM's expression of it (kept
    above): the same outcome for every group (checked: the answer, or the rows a claim and an
    outcome leave), and the Python CPU per call of each, in three alternating rounds."""
    from incidents import services as incident_services
    from incidents.models import SynthesisStatus
    from incidents.provenance import groups_provenance
    from skills.approvals.notifications import _anyone_to_notify
    from skills.library.models import SkillRevision

    revisions = list(
        SkillRevision.objects.filter(source_groups__in=group_ids).select_related("skill")
    )
    written = {
        "provenance count": lambda g: groups_provenance([g]),
        "claim": lambda g: incident_services.group_synthesis_claim(group_id=g),
        "outcome (proposed)": lambda g: incident_services.group_synthesis_finish(
            group_id=g, status=SynthesisStatus.PROPOSED
        ),
        "anyone to notify": _anyone_to_notify,
    }
    orm = {
        "provenance count": lambda g: _provenance_orm([g]),
        "claim": _claim_orm,
        "outcome (proposed)": _finish_orm,
        "anyone to notify": _anyone_to_notify_orm,
    }
    for group_id in group_ids:
        assert written["provenance count"](group_id) == orm["provenance count"](group_id)
    for revision in revisions:
        assert _anyone_to_notify(revision) == _anyone_to_notify_orm(revision), revision.pk
    spent = {(name, way): 0.0 for name in written for way in ("written out", "ORM")}

    def timed(name: str, way: str, function, item):
        started = time.process_time()
        result = function(item)
        spent[(name, way)] += time.process_time() - started
        return result

    for _ in range(3):
        for way, functions in (("written out", written), ("ORM", orm)):
            for name in ("provenance count", "anyone to notify"):
                items = group_ids if name == "provenance count" else revisions
                for item in items:
                    timed(name, way, functions[name], item)
            # A claim and its outcome on each group, from the state an ingest leaves; both ways
            # must leave the same rows.
            for group_id in group_ids:
                _group_reset(group_id, attempts=0)
                assert timed("claim", way, functions["claim"], group_id) is not None
                assert timed("outcome (proposed)", way, functions["outcome (proposed)"], group_id)
                state = _group_state(group_id)
                # Proposed, claimed once, the group's events counted at its synthesis.
                assert state[:3] == (SynthesisStatus.PROPOSED, 1, True), state
                assert set(state[3]) == {"proposed"}, state
    print("written-out queries of the synthesis path against the ORM (same outcomes, checked):")
    for name in written:
        calls = 3 * (len(revisions) if name == "anyone to notify" else len(group_ids))
        sql, via_orm = (spent[(name, way)] / calls * 1000 for way in ("written out", "ORM"))
        print(
            f"  {name:20s} Python CPU per call: written out {sql:.3f} ms, ORM {via_orm:.3f} ms "
            f"({via_orm / sql:.1f}x)"
        )


if __name__ == "__main__":
    main()
