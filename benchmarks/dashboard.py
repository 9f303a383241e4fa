#!/usr/bin/env python
"""Server time of the dashboard's busiest pages on a realistic data set, at two sizes.

Loads 10,000 incidents in 2,000 groups, 500 skills (with proposals waiting in the review
queue, policy versions holding them) and 20,000 audit events into a PostgreSQL database of its
own (`metaclaw_bench_dash`, bulk inserts), then requests each page in-process through Django's
test client (no network, so the time is the server's: middleware, queries, templates) and prints
p50/p99 per page; then copies the incidents inside PostgreSQL up to the next size (``--sizes``,
default 10k and 1M: ``_growth.py``) and measures again, so that growth shows.

    python benchmarks/dashboard.py [--requests 100] [--reload] [--sizes 10k,1M]

Target on this 2-core machine: p99 ≤ 150 ms for each page.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from datetime import timedelta

from _growth import grow_incidents, parse_sizes
from _harness import django_ready

GROUPS = 2_000
SKILLS = 500
PROPOSALS = 200  # pending revisions in the review queue
CHANGED = 20  # skills revised between the two versions that are diffed
ADDED = 10  # skills added between them
AUDIT_EVENTS = 20_000
SLUG = "bench-dashboard"


def _messages(n: int) -> list[dict]:
    return [
        {"role": "system", "content": "You are Acme's support assistant."},
        {"role": "user", "content": f"Where is my order {n}? Mail me at user{n}@example.com"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{n}", "type": "function",
             "function": {"name": "search_orders", "arguments": '{"since": "last week"}'}}]},
        {"role": "tool", "tool_call_id": f"call_{n}", "content": "error: 'since' must be ISO 8601"},
        {"role": "assistant", "content": "Sorry, I couldn't look that up."},
    ]  # fmt: skip


def load(incidents: int) -> None:
    from django.db import connection, transaction
    from django.utils import timezone

    from base.models import AuditEvent, Project
    from incidents.models import Incident, IncidentGroup
    from metaclaw_site.projects import project_create
    from skills.library.models import Origin, RevisionStatus, Skill, SkillRevision
    from skills.versions.models import PolicyVersion, Release, ReleaseKind, VersionStatus

    rng = random.Random(7)
    now = timezone.now()
    # Releases protect the versions they name: remove them before the project.
    Release.objects.filter(project__slug=SLUG).delete()
    Project.objects.filter(slug=SLUG).delete()
    project = project_create(name="Bench dashboard", slug=SLUG)
    started = time.perf_counter()
    kinds = ["tool_error", "wrong_answer", "timeout", "user_complaint"]
    severities = ["low", "medium", "high", "critical"]
    with transaction.atomic():
        groups = IncidentGroup.objects.bulk_create(
            [
                IncidentGroup(
                    project=project,
                    fingerprint=f"fp-{g:05d}",
                    title=f"Error{g}: search_orders: invalid value for 'since' ({g})",
                    agent_name=f"agent-{g % 8}",
                    kind=kinds[g % 4],
                    error_type=f"Error{g}",
                    tool_name="search_orders",
                    normalized_message="search_orders: invalid value <str> for 'since'",
                    severity=severities[g % 4],
                    event_count=incidents // GROUPS,
                    first_seen=now - timedelta(days=30),
                    last_seen=now - timedelta(minutes=g),
                    synthesis_status="proposed" if g < PROPOSALS else "none",
                )
                for g in range(GROUPS)
            ],
            batch_size=1000,
        )
        batch: list[Incident] = []
        for n in range(incidents):
            group = groups[n % GROUPS]
            batch.append(
                Incident(
                    id=uuid.uuid4(),
                    project=project,
                    client_id=f"inc-{n}",
                    group=group,
                    agent_name=group.agent_name,
                    kind=group.kind,
                    severity=group.severity,
                    error_type=group.error_type,
                    error_message=f"search_orders: invalid value 'x{n}' for 'since' (request {n})",
                    tool_name="search_orders",
                    messages=_messages(n),
                    fingerprint=group.fingerprint,
                    occurred_at=now - timedelta(seconds=rng.randint(0, 30 * 86400)),
                    received_at=now,
                )
            )
            if len(batch) == 5000:
                Incident.objects.bulk_create(batch)
                batch = []
        if batch:
            Incident.objects.bulk_create(batch)
        print(f"  incidents and groups loaded in {time.perf_counter() - started:.1f}s", flush=True)

        skills = Skill.objects.bulk_create(
            [
                Skill(project=project, slug=f"skill-{s:03d}", category="common_mistakes")
                for s in range(SKILLS)
            ]
        )
        text = (
            "When a tool rejects a relative date, convert it to an ISO 8601 date (YYYY-MM-DD) "
            "from today's date and call the tool again; never pass words like 'last week'. "
        ) * 3

        def revision(skill, number, status, instructions=text):
            return SkillRevision(
                skill=skill, number=number, name=f"Skill {skill.slug} r{number}",
                description="When a tool wants a date.", instructions=instructions,
                category="common_mistakes", author="llm", origin=Origin.DEMO_FIXTURE,
                status=status, status_changed_at=now, created_at=now - timedelta(hours=number),
            )  # fmt: skip

        base_count = SKILLS - ADDED
        first = SkillRevision.objects.bulk_create(
            [revision(s, 1, RevisionStatus.APPROVED) for s in skills[:base_count]]
        )
        changed = SkillRevision.objects.bulk_create(
            [
                revision(s, 2, RevisionStatus.APPROVED, text + f"Revised {i}: check the timezone.")
                for i, s in enumerate(skills[:CHANGED])
            ]
        )
        added = SkillRevision.objects.bulk_create(
            [revision(s, 1, RevisionStatus.APPROVED) for s in skills[base_count:]]
        )
        proposals = SkillRevision.objects.bulk_create(
            [
                revision(s, 3 if i < CHANGED else 2, RevisionStatus.PROPOSED, text + f"Prop {i}.")
                for i, s in enumerate(skills[:PROPOSALS])
            ]
        )
        group_link = SkillRevision.source_groups.through
        incident_link = SkillRevision.source_incidents.through
        group_link.objects.bulk_create(
            [group_link(skillrevision_id=r.pk, incidentgroup_id=groups[i].pk)
             for i, r in enumerate(proposals)]
        )  # fmt: skip
        with connection.cursor() as cursor:
            # Five evidence incidents per proposal: the latest of its group.
            cursor.execute(
                f"""
                INSERT INTO {incident_link._meta.db_table} (skillrevision_id, incident_id)
                SELECT l.skillrevision_id, i.id FROM {group_link._meta.db_table} l
                CROSS JOIN LATERAL (
                    SELECT id FROM incidents_incident WHERE group_id = l.incidentgroup_id
                    ORDER BY occurred_at DESC LIMIT 5
                ) i
                """
            )
        v1 = PolicyVersion.objects.get(project=project, number=1)
        PolicyVersion.objects.filter(pk=v1.pk).update(status=VersionStatus.RETIRED)
        v2 = PolicyVersion.objects.create(
            project=project, number=2, parent=v1, status=VersionStatus.RETIRED,
            changelog="All base skills", base_model="Qwen3-8B", created_at=now,
        )  # fmt: skip
        v3 = PolicyVersion.objects.create(
            project=project, number=3, parent=v2, status=VersionStatus.ACTIVE,
            changelog="Revised and added skills", base_model="Qwen3-8B",
            adapter_ref="tinker://bench/sampler_weights/0003", created_at=now,
        )  # fmt: skip
        through = PolicyVersion.revisions.through
        v3_revisions = changed + first[CHANGED:] + added
        through.objects.bulk_create(
            [through(policyversion_id=v2.pk, skillrevision_id=r.pk) for r in first]
            + [through(policyversion_id=v3.pk, skillrevision_id=r.pk) for r in v3_revisions]
        )
        Release.objects.create(
            project=project, kind=ReleaseKind.PROMOTION, from_version=v2, to_version=v3,
            actor_label="bench",
        )  # fmt: skip
        actions = ["skill_revision.approve", "skill_revision.reject", "api_key.create",
                   "incident_group.resolved", "policy_version.promotion"]  # fmt: skip
        AuditEvent.objects.bulk_create(
            [
                AuditEvent(
                    project=project,
                    actor_label=f"user{e % 9}",
                    action=actions[e % 5],
                    object_type="skills.skillrevision",
                    object_id=str(e),
                    object_repr=f"obj {e}",
                    before={"status": "proposed"},
                    after={"status": "approved"},
                    created_at=now - timedelta(seconds=e * 7),
                )  # fmt: skip
                for e in range(AUDIT_EVENTS)
            ],
            batch_size=5000,
        )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    print(f"  loaded everything in {time.perf_counter() - started:.1f}s", flush=True)


def measure(requests: int) -> list[tuple[str, str, float, float, float, int]]:
    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import NoReverseMatch, reverse

    from base import services as site_services
    from base.models import Project

    project = Project.objects.get(slug=SLUG)
    user = get_user_model().objects.filter(username="bench-admin").first()
    if user is None:
        user = site_services.user_create(username="bench-admin", password="bench-password-1")
    # Every time: a reload makes the project anew, and its members with it.
    site_services.membership_set(project=project, user=user, role="admin")
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(user)
    kwargs = {"project_slug": SLUG}
    pages: list[tuple[str, str | None]] = [
        ("review queue", reverse("skills:review_queue", kwargs=kwargs)),
        ("group list", reverse("incidents:group_list", kwargs=kwargs)),
        ("version diff v2→v3", reverse("skills:version_diff", kwargs=kwargs) + "?from=2&to=3"),
    ]
    try:
        pages.append(("audit log", reverse("project:audit_log", kwargs=kwargs)))
    except NoReverseMatch:
        pages.append(("audit log", None))
    results = []
    for name, path in pages:
        if path is None:
            results.append((name, "(not built yet: skipped)", 0.0, 0.0, 0.0, 0))
            continue
        for _ in range(5):  # warm caches, connections, templates
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)
        times, cpu = [], []
        for _ in range(requests):
            t0, c0 = time.perf_counter(), time.process_time()
            response = client.get(path)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            assert response.status_code == 200
        times.sort()
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] * 1000
        results.append(
            (name, path, statistics.median(times) * 1000, p99, statistics.median(cpu) * 1000,
             len(response.content))
        )  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--reload", action="store_true", help="reload the data set")
    parser.add_argument("--sizes", default="10k,1M", help="incidents at each measurement")
    args = parser.parse_args()
    sizes = parse_sizes(args.sizes)
    django_ready("metaclaw_bench_dash", redis_db=2)
    from django.test.utils import setup_test_environment

    from base.models import Project
    from incidents.models import Incident

    setup_test_environment()  # the test client, not a test database
    project = Project.objects.filter(slug=SLUG).first()
    if (
        args.reload
        or project is None
        or Incident.objects.filter(project=project).count() != sizes[0]
    ):
        print(f"Loading {sizes[0]:,} incidents in {GROUPS:,} groups, {SKILLS} skills…", flush=True)
        load(sizes[0])
    ok = True
    per_size = []
    for size in sizes:
        project = Project.objects.get(slug=SLUG)
        if Incident.objects.filter(project=project).count() < size:
            seconds = grow_incidents(project.pk, size)
            print(f"  grew to {size:,} incidents in {seconds:.1f} s", flush=True)
        results = measure(args.requests)
        per_size.append((size, results))
        load1, load5, _ = os.getloadavg()
        print(f"\nServer time over {args.requests} requests per page, {size:,} incidents "
              f"(PostgreSQL, in-process; load average {load1:.1f}/{load5:.1f} on "
              f"{os.cpu_count()} cores):")  # fmt: skip
        print(
            f"{'page':22} {'p50 ms':>8} {'p99 ms':>8} {'CPU p50':>8} {'bytes':>9}  target p99 ≤ 150 ms"
        )
        for name, path, p50, p99, cpu, size_bytes in results:
            if size_bytes == 0:
                print(f"{name:22} {path}")
                continue
            verdict = "ok" if p99 <= 150 else "OVER"
            ok = ok and p99 <= 150
            print(f"{name:22} {p50:8.1f} {p99:8.1f} {cpu:8.1f} {size_bytes:9,}  {verdict}")
    print("CPU p50: this process's CPU time per request (the part other load cannot inflate much).")
    if len(per_size) > 1:
        (small, first), (large, last) = per_size[0], per_size[-1]
        print(
            f"\ngrowth, {small:,} → {large:,} incidents ({large / small:.0f}× the rows), p50 ratio:"
        )
        for (name, _, p50a, *_rest), (_, _, p50b, *_rest2) in zip(first, last, strict=True):
            if p50a:
                print(f"  {name:22} {p50a:7.1f} → {p50b:7.1f} ms  ×{p50b / p50a:.2f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
