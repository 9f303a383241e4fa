#!/usr/bin/env python
"""The ingestion hot path's written-out SQL against the Django ORM doing the same, in process.

``incidents.ingest`` stores incidents and trajectories through four statements written out in
``incidents.ingest_sql``: the groups' upsert (``INSERT ... ON CONFLICT DO UPDATE`` adding the
counts), the incidents' ``INSERT ... ON CONFLICT DO NOTHING RETURNING id``, the read of the
client ids stored already, and ``COPY`` for the proxy's recorded turns; inside the same
transaction ``skills.synthesis.regressions`` reads which revisions came from the groups and
which of those are live, in two more. This script runs ``incidents_ingest`` and
``trajectories_store`` unchanged with those statements swapped for ORM versions of the same
thing (below), and with them swapped for nothing at all: the baseline, what the rest of the
ingest costs. It first checks that both versions leave the same database state for the same
input, then prints, per workload, several runs' median and range of incidents (or turns) per
second, and the CPU per item of this process and of its PostgreSQL backend (the figure that
matters on a machine where web, workers and PostgreSQL share the cores). Half the groups have
a proposed skill, as groups do once the fast loop has seen them.

No HTTP and no Celery here: ``benchmarks/ingest.py`` measures the endpoints under the production
server; the fast loop's enqueue after commit is switched off, as in ``synthesis_cost.py``. One
file past 500 lines: the ORM versions, the check of their equivalence and the measurement read
best together, and nothing else imports them.

    python benchmarks/ingest_orm.py [--impl sql|orm|both] [--runs 5] [--singles 300]
                                    [--batches 6] [--batch-size 500] [--turns 50]
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from unittest import mock

import orjson
from _harness import backend_cpu_clock, django_ready, median_spread
from ingest import incident as incident_payload

# --- The ORM versions of incidents.ingest_sql's statements -----------------------------------


def orm_upsert_groups(project, incidents, now) -> dict[str, dict]:
    """``ingest_sql.upsert_groups`` through the ORM. ``bulk_create(update_conflicts=True)`` can
    only copy the new row over the old one, not add to its counts, so: lock the groups that
    exist, create the missing ones (``ignore_conflicts``: a concurrent ingest may create one
    first) and lock those too, then add the batch to the older groups in one ``bulk_update``.
    A group this call created carries ``created_at == now``, as in the SQL version."""
    from django.db.models import F

    from incidents.ingest_sql import GROUP_COUNTED_FIELDS
    from incidents.models import SEVERITY_RANK, GroupStatus, IncidentGroup, SynthesisStatus

    batches: dict[str, list] = {}
    for incident in incidents:
        batches.setdefault(incident.fingerprint, []).append(incident)
    fingerprints = sorted(batches)

    def locked(wanted: list[str]) -> dict[str, IncidentGroup]:
        rows = IncidentGroup.objects.select_for_update().filter(
            project=project, fingerprint__in=wanted
        )
        return {group.fingerprint: group for group in rows.order_by("fingerprint")}

    groups = locked(fingerprints)
    missing = [fp for fp in fingerprints if fp not in groups]
    if missing:
        IncidentGroup.objects.bulk_create(
            [_new_group(project, batches[fp], now) for fp in missing], ignore_conflicts=True
        )
        groups.update(locked(missing))

    result: dict[str, dict] = {}
    older: list[IncidentGroup] = []
    for fp in fingerprints:
        group, batch = groups[fp], batches[fp]
        created = group.created_at == now
        regressed = not created and group.status == GroupStatus.RESOLVED
        awaits = created or group.synthesis_status == SynthesisStatus.NONE
        if not created:
            severity = max((i.severity for i in batch), key=SEVERITY_RANK.__getitem__)
            group.event_count = F("event_count") + len(batch)
            group.first_seen = min(group.first_seen, *(i.occurred_at for i in batch))
            group.last_seen = max(group.last_seen, *(i.occurred_at for i in batch))
            if SEVERITY_RANK[severity] > SEVERITY_RANK[group.severity]:
                group.severity = severity
            if regressed:
                group.status = GroupStatus.REGRESSED
                group.regressed_at = group.status_changed_at = now
            if group.synthesis_status == SynthesisStatus.NONE:
                group.synthesis_status = SynthesisStatus.WAITING
                group.synthesis_requested_at = now
            older.append(group)
        result[fp] = {
            "id": group.pk,
            "regressed": regressed,
            "created": created,
            "awaits_synthesis": awaits,
            "count": len(batch),
        }
    if older:
        IncidentGroup.objects.bulk_update(older, GROUP_COUNTED_FIELDS)
    return result


def _new_group(project, batch: list, now: datetime):
    from incidents.fingerprint import FINGERPRINT_VERSION
    from incidents.ingest_sql import incident_title
    from incidents.models import SEVERITY_RANK, IncidentGroup, SynthesisStatus

    first = batch[0]
    return IncidentGroup(
        project=project,
        fingerprint=first.fingerprint,
        fingerprint_version=FINGERPRINT_VERSION,
        title=incident_title(first.error_type, first.error_message, first.kind, first.agent_name),
        agent_name=first.agent_name,
        kind=first.kind,
        error_type=first.error_type,
        tool_name=first.tool_name,
        normalized_message=first.normalized_message,
        severity=max((i.severity for i in batch), key=SEVERITY_RANK.__getitem__),
        event_count=len(batch),
        first_seen=min(i.occurred_at for i in batch),
        last_seen=max(i.occurred_at for i in batch),
        synthesis_status=SynthesisStatus.WAITING,
        synthesis_requested_at=now,
        created_at=now,
    )


def orm_insert_incidents(incidents: list) -> set[uuid.UUID]:
    """``ingest_sql.insert_incidents`` through the ORM: ``bulk_create(ignore_conflicts=True)``
    (which returns no ids), then read back which of ours were stored. The JSON columns come as
    JSON text from ``_build_incident``; a model wants them as objects (``orjson`` parses them
    back in a few microseconds, noise beside the ORM's own encoding)."""
    from incidents.models import Incident

    fields = [(f.attname, f.get_internal_type() == "JSONField") for f in _concrete(Incident)]
    Incident.objects.bulk_create(
        [
            Incident(
                **{
                    name: orjson.loads(getattr(inc, name)) if is_json else getattr(inc, name)
                    for name, is_json in fields
                }
            )
            for inc in incidents
        ],
        ignore_conflicts=True,
    )
    ours = [inc.id for inc in incidents]
    return set(Incident.objects.filter(pk__in=ours).values_list("id", flat=True))


def orm_stored_incidents(project_id: int, client_ids: list[str]) -> dict[str, tuple]:
    """``ingest_sql.stored_incidents`` through the ORM."""
    from incidents.models import Incident

    if not client_ids:
        return {}
    rows = Incident.objects.filter(project_id=project_id, client_id__in=client_ids)
    return {row[0]: row for row in rows.values_list("client_id", "id", "group_id", "status")}


def orm_copy_rows(model, rows) -> None:
    """``ingest_sql.copy_rows`` (``COPY ... FROM STDIN``) through the ORM."""
    model.objects.bulk_create(rows)


def _concrete(model) -> list:
    return list(model._meta.concrete_fields)


# --- The baseline: the same ingest with those statements doing nothing -----------------------


def none_upsert_groups(project, incidents, now) -> dict[str, dict]:
    fingerprints = sorted({inc.fingerprint for inc in incidents})
    info = {"regressed": False, "created": False, "awaits_synthesis": False, "count": 0}
    return {fp: {**info, "id": -n - 1} for n, fp in enumerate(fingerprints)}


def orm_source_revisions(group_ids: list[int]) -> list[tuple[int, int]]:
    """``skills.synthesis.regressions.source_revisions`` (inside every ingest) by the ORM."""
    from skills.library.models import SkillRevision

    rows = SkillRevision.source_groups.through.objects.filter(incidentgroup_id__in=group_ids)
    return list(rows.values_list("skillrevision_id", "incidentgroup_id"))


def orm_active_revisions(project, revision_ids: list[int]) -> set[int]:
    """``skills.synthesis.regressions.active_revisions`` by the ORM."""
    from skills.versions.models import PolicyVersion, VersionStatus

    rows = PolicyVersion.revisions.through.objects.filter(
        policyversion__project=project,
        policyversion__status=VersionStatus.ACTIVE,
        skillrevision_id__in=revision_ids,
    )
    return set(rows.values_list("skillrevision_id", flat=True))


# What each version puts in place of the written-out statements: module -> {name: function}.
INGEST, REGRESSIONS = "incidents.ingest", "skills.synthesis.regressions"
IMPLEMENTATIONS: dict[str, dict[str, dict[str, Callable]]] = {
    "sql": {},  # as they are
    "orm": {
        INGEST: {
            "upsert_groups": orm_upsert_groups,
            "insert_incidents": orm_insert_incidents,
            "stored_incidents": orm_stored_incidents,
            "copy_rows": orm_copy_rows,
        },
        REGRESSIONS: {
            "source_revisions": orm_source_revisions,
            "active_revisions": orm_active_revisions,
        },
    },
    "baseline": {
        INGEST: {
            "upsert_groups": none_upsert_groups,
            "insert_incidents": lambda incidents: {inc.id for inc in incidents},
            "stored_incidents": lambda project_id, client_ids: {},
            "copy_rows": lambda model, rows: None,
        },
        REGRESSIONS: {"source_revisions": lambda group_ids: []},
    },
}


@contextmanager
def implementation(name: str) -> Iterator[None]:
    """The ingest with the statements of ``name``. Refuses to run if a module no longer calls
    them by these names (the comparison would silently measure nothing)."""
    with ExitStack() as stack:
        for module_name, swaps in IMPLEMENTATIONS[name].items():
            module = importlib.import_module(module_name)
            missing = [attr for attr in swaps if not hasattr(module, attr)]
            if missing:
                raise SystemExit(f"{module_name} no longer has {missing}: update this benchmark.")
            stack.enter_context(mock.patch.multiple(module, **swaps))
        yield


# --- The same database state from both ------------------------------------------------------


def check_same_state(make_project: Callable) -> str:
    """Run one scripted sequence of ingests (new groups, repeated client ids inside a batch and
    across batches, resolved groups regressing, a group out of the fast loop asked back, a group
    with a proposal and one whose skill is live, earlier and later timestamps, higher
    severities; single items; a batch of recorded turns)
    through each version, each in a project of its own on a frozen clock, and compare what
    they stored and answered. Returns a line saying what was compared."""
    from django.utils import timezone

    from incidents import ingest, services
    from incidents.models import Incident, IncidentGroup, SynthesisStatus, Trajectory
    from incidents.schemas import IncidentIn
    from skills.versions.services import skill_revision_approve

    start = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

    def item(key: str, n: int, *, severity: str = "high", minutes_ago: int | None = None):
        payload = incident_payload(key, n)
        payload["severity"] = severity
        if minutes_ago is not None:
            payload["occurred_at"] = (start - timedelta(minutes=minutes_ago)).isoformat()
        return IncidentIn(**payload)

    first = [item(f"a{n}", n, minutes_ago=n % 7) for n in range(40)] + [item("a3", 3)]
    second = (
        [item(f"a{n}", n) for n in range(0, 40, 5)]  # stored already
        + [item(f"b{n}", n, severity="critical", minutes_ago=30) for n in range(0, 60, 3)]
        + [item(f"b{n}", n, severity="low") for n in range(60, 70)]  # new groups too
    )
    singles = [item(f"c{n}", n, severity="medium") for n in range(5)] + [item("a1", 1)]

    def scenario(name: str) -> dict:
        project = make_project(f"check-{name}")
        answers = []
        clock = [start]

        def tick() -> None:  # each step at its own instant, the same in both runs
            clock[0] += timedelta(seconds=1)

        with implementation(name), mock.patch.object(timezone, "now", lambda: clock[0]):
            answers += ingest.incidents_ingest(project=project, items=first)
            tick()
            group_of = {answer.client_id: answer.group_id for answer in answers}
            groups = IncidentGroup.objects.filter(project=project)
            for client_id in ("a3", "a6", "a9"):  # the second batch brings more of these
                group = groups.get(pk=group_of[client_id])
                services.group_set_status(group=group, status="resolved", actor=None)
            groups.filter(pk=group_of["a12"]).update(synthesis_status=SynthesisStatus.NONE)
            _propose(project, [group_of["a2"]], "pending")
            live = _propose(project, [group_of["a1"]], "live")[0]
            skill_revision_approve(revision=live, actor=None, actor_label="benchmark")
            tick()
            answers += ingest.incidents_ingest(project=project, items=second)
            for one in singles:
                tick()
                answers += ingest.incidents_ingest(project=project, items=[one])
            ingest.trajectories_store(trajectories=_turns(project, 5, start))
        fingerprint = dict(
            IncidentGroup.objects.filter(project=project).values_list("id", "fingerprint")
        )
        skip = {"id", "project_id", "group_id", "merged_into_id"}
        return {
            "answers": [
                (a.client_id, fingerprint[a.group_id], a.status, a.duplicate) for a in answers
            ],
            "groups": sorted(
                tuple((k, v) for k, v in row.items() if k not in skip)
                for row in IncidentGroup.objects.filter(project=project).values()
            ),
            "incidents": sorted(
                (fingerprint[row["group_id"]], *((k, v) for k, v in row.items() if k not in skip))
                for row in Incident.objects.filter(project=project).values()
            ),
            "turns": sorted(
                tuple((k, v) for k, v in row.items() if k not in skip)
                for row in Trajectory.objects.filter(project=project).values()
            ),
        }

    sql, orm = scenario("sql"), scenario("orm")
    for part in sql:
        if sql[part] != orm[part]:
            differing = [
                pair for pair in zip(sql[part], orm[part], strict=False) if pair[0] != pair[1]
            ]
            raise SystemExit(
                f"The SQL and ORM versions stored different {part}: first difference "
                f"{differing[:1] or (len(sql[part]), len(orm[part]))}"
            )
    regressed = sum(("status", "regressed") in group for group in sql["groups"])
    if regressed < 4:  # the three resolved groups and the one whose skill is live
        raise SystemExit(f"The check regressed {regressed} groups, not 4: it tests too little.")
    return (
        f"same database state from both versions: {len(sql['groups'])} groups "
        f"({regressed} regressed), {len(sql['incidents'])} incidents, "
        f"{len(sql['answers'])} answers, {len(sql['turns'])} turns compared"
    )


def _propose(project, group_ids: list[int], prefix: str) -> list:
    """A proposed revision of a skill of its own for each of these groups, as the fast loop
    leaves them."""
    from incidents.models import IncidentGroup
    from skills.library.models import Origin
    from skills.library.services import RevisionDraft, skill_revision_propose

    return [
        skill_revision_propose(
            project=project,
            draft=RevisionDraft(
                slug=f"{prefix}-{n}",
                name="ISO dates for order search",
                description="When calling search_orders with a date the user gave in words.",
                instructions="Convert relative dates to ISO 8601 before calling search_orders.",
                origin=Origin.DEMO_FIXTURE,
                source_groups=[IncidentGroup.objects.get(pk=group_id)],
            ),
        )
        for n, group_id in enumerate(group_ids)
    ]


def _turns(project, count: int, now: datetime) -> list:
    """Turns as the proxy records them (``skills.runtime.recording``), agent-sized."""
    from incidents.models import Trajectory, TrajectorySource

    messages = [
        {"role": "system", "content": "You are the order desk's assistant. " * 20},
        {"role": "user", "content": "Where is my order from last week? It was order 4411."},
        {"role": "assistant", "content": "Let me look that up for you. " * 10},
    ]
    return [
        Trajectory(
            id=uuid.uuid4(),
            project_id=project.pk,
            session_id=f"session-{n % 7}",
            source=TrajectorySource.PROXY,
            agent_name="order-desk",
            model="gpt-4o-mini",
            messages=messages,
            response={"role": "assistant", "content": f"Your order {n} ships tomorrow."},
            tools=[{"type": "function", "function": {"name": "search_orders"}}],
            skills_injected=["date-ranges"],
            latency_ms=12.5,
            prompt_tokens=420,
            completion_tokens=12,
            status_code=200,
            metadata={"requested_model": "gpt-4o-mini", "stream": False},
            occurred_at=now,
            received_at=now,
        )
        for n in range(count)
    ]


# --- Measuring -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["sql", "orm", "both"], default="both")
    parser.add_argument("--runs", type=int, default=5, help="runs of each workload")
    parser.add_argument("--singles", type=int, default=300, help="one-item ingests per run")
    parser.add_argument("--batches", type=int, default=6, help="batches per run")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--turns", type=int, default=50, help="recorded turns per batch")
    args = parser.parse_args()

    django_ready("metaclaw_bench_ingest_orm", redis_db=9, fresh=True)

    from django.db import connection, transaction

    from incidents import ingest, signals
    from incidents.models import IncidentGroup
    from incidents.schemas import IncidentIn
    from metaclaw_site.projects import project_create
    from skills import signals as skill_signals
    from skills.synthesis import regressions

    signals.groups_await_synthesis.receivers.clear()  # no worker: measure the ingest alone
    skill_signals.revision_proposed.receivers.clear()  # and nobody to notify of proposals
    run_id = secrets.token_hex(3)

    def make_project(name: str):
        return project_create(name=name, slug=f"{name}-{run_id}")

    print(check_same_state(make_project))

    impls = ["baseline", "sql", "orm"] if args.impl == "both" else ["baseline", args.impl]
    projects = {name: make_project(f"bench-{name}") for name in impls}
    serial = itertools.count()

    def items(project, count: int) -> list:
        return [
            IncidentIn(**incident_payload(f"{run_id}-{n}", n))
            for n in itertools.islice(serial, count)
        ]

    def ingest_singles(project, work: list) -> None:
        for one in work:
            ingest.incidents_ingest(project=project, items=[one])

    def ingest_batches(project, work: list) -> None:
        for start in range(0, len(work), args.batch_size):
            ingest.incidents_ingest(project=project, items=work[start : start + args.batch_size])

    def store_turns(project, work: list) -> None:
        for batch in work:
            ingest.trajectories_store(trajectories=batch)

    def turns(project, count: int) -> list:
        now = datetime.now(UTC)
        return [_turns(project, args.turns, now) for _ in range(count // args.turns)]

    def some_groups(project, count: int) -> list:
        groups = list(IncidentGroup.objects.filter(project=project).values_list("pk", flat=True))
        return [groups[n % len(groups)] for n in range(count)]

    def check_regressions(project, work: list) -> None:
        for group_id in work:
            with transaction.atomic():
                regressions.skill_regressions_detect(
                    project=project, group_ids=[group_id], incident_ids=[]
                )

    # (label, unit, items a run, make the work, do it, measure the baseline too)
    workloads = [
        ("single item", "incidents", args.singles, items, ingest_singles, True),
        (f"batch of {args.batch_size}", "incidents", args.batches * args.batch_size, items,
         ingest_batches, True),
        # trajectories_store does nothing but the COPY: no baseline to speak of.
        (f"turns, {args.turns} a batch", "turns", args.batches * args.turns * 4, turns,
         store_turns, False),
        # What the regression check alone costs an ingest (the second read for half the groups).
        ("regression check", "checks", args.singles, some_groups, check_regressions, False),
    ]  # fmt: skip
    backend_cpu = backend_cpu_clock(connection)
    for name in impls:  # warm-up: the groups exist before measuring, as in production
        with implementation(name):
            ingest_batches(projects[name], items(None, args.batch_size))
        groups = IncidentGroup.objects.filter(project=projects[name]).order_by("pk")
        _propose(projects[name], list(groups.values_list("pk", flat=True)[::2]), "skill")
    print(
        f"PostgreSQL + this process, {os.cpu_count()} cores; {args.runs} runs of each, "
        "median (min-max); CPU per item: this process + its PostgreSQL backend"
    )
    for label, unit, size, make_work, run, with_baseline in workloads:
        names = [name for name in impls if with_baseline or name != "baseline"]
        figures = {name: {"rate": [], "py": [], "pg": []} for name in names}
        for turn in range(args.runs):  # the order rotates: no version always goes first
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                project = projects[name]
                work = make_work(project, size)
                with implementation(name):
                    pg, py, wall = backend_cpu(), time.process_time(), time.perf_counter()
                    run(project, work)
                    wall = time.perf_counter() - wall
                    py, pg = time.process_time() - py, backend_cpu() - pg
                figures[name]["rate"].append(size / wall)
                figures[name]["py"].append(py / size * 1e6)
                figures[name]["pg"].append(pg / size * 1e6)
        for name in names:
            rate, low, high = median_spread(figures[name]["rate"])
            cpu = [py + pg for py, pg in zip(figures[name]["py"], figures[name]["pg"], strict=True)]
            total, cpu_low, cpu_high = median_spread(cpu)
            print(
                f"{label:<18} {name:<8} {rate:7.0f} {unit}/s ({low:.0f}-{high:.0f})  "
                f"CPU {total:5.0f} us/item ({cpu_low:.0f}-{cpu_high:.0f}; "
                f"Python {median_spread(figures[name]['py'])[0]:.0f} + "
                f"PostgreSQL {median_spread(figures[name]['pg'])[0]:.0f})"
            )


if __name__ == "__main__":
    main()
