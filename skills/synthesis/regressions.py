"""A new incident in a group whose skill is live: the group is marked regressed and the skill
asked for a revision (inside the ingest transaction)."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from django.db import connection
from django.utils import timezone

from base.models import Project
from base.sql import placeholders
from incidents import services as incident_services
from incidents.models import Incident, SynthesisStatus
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, VersionStatus

logger = logging.getLogger(__name__)

# --- Regressions ----------------------------------------------------------------------------


def skill_regressions_detect(
    *, project: Project, group_ids: list[int], incident_ids: list[Any]
) -> list[int]:
    """New incidents in groups whose skill is in the ACTIVE policy: the skill did not work.
    Marks those groups regressed and asks for a revision of the skill (unless one is pending
    already: then the incidents are just more evidence). Runs inside the ingest transaction,
    which holds the batch's group locks, so it reads and writes in a constant number of
    queries whatever the number of groups. Returns the regressed group ids."""
    sources = source_revisions(group_ids)
    if not sources:
        return []
    active = active_revisions(project, sorted({revision_id for revision_id, _ in sources}))
    if not active:
        return []
    details = {
        row[0]: row
        for row in SkillRevision.objects.filter(pk__in=active).values_list(
            "id", "skill_id", "skill__slug", "status_changed_at"
        )
    }
    wanted = set(group_ids)
    hits = [
        (*details[revision_id], group_id)
        for revision_id, group_id in sorted(sources)
        if revision_id in details and group_id in wanted
    ]
    if not hits:
        return []
    # The policy versions each revision is in, the batch's incidents of these groups and the
    # skills' pending proposals: one read each, checked below in memory.
    numbers: dict[int, set[int]] = defaultdict(set)
    for revision_id, number in PolicyVersion.revisions.through.objects.filter(
        policyversion__project=project, skillrevision_id__in=sorted(details)
    ).values_list("skillrevision_id", "policyversion__number"):
        numbers[revision_id].add(number)
    arrived: dict[int, list[tuple[int | None, Any]]] = defaultdict(list)
    for group_id, version, occurred_at in Incident.objects.filter(
        project=project, pk__in=incident_ids, group_id__in=sorted({h[4] for h in hits})
    ).values_list("group_id", "policy_version", "occurred_at"):
        arrived[group_id].append((version, occurred_at))
    proposals: dict[int, list[Any]] = defaultdict(list)
    for skill_id, created_at in SkillRevision.objects.filter(
        skill_id__in=sorted({h[1] for h in hits}), status=RevisionStatus.PROPOSED
    ).values_list("skill_id", "created_at"):
        proposals[skill_id].append(created_at)

    now = timezone.now()
    reasons: dict[int, str] = {}
    ask_again: list[int] = []
    for revision_id, skill_id, slug, approved_at, group_id in hits:
        since = approved_at or now
        ran_with_skill = any(
            version in numbers[revision_id] or (version is None and occurred_at >= since)
            for version, occurred_at in arrived[group_id]
        )
        if not ran_with_skill:
            continue
        reasons.setdefault(
            group_id,
            f"A new incident arrived although the skill '{slug}' is in the active policy.",
        )
        if not any(created_at > since for created_at in proposals[skill_id]):
            ask_again.append(group_id)
    incident_services.groups_mark_regressed(project=project, reasons=reasons)
    incident_services.groups_request_synthesis(
        group_ids=ask_again,
        from_statuses=[
            SynthesisStatus.NONE,
            SynthesisStatus.PROPOSED,
            SynthesisStatus.NO_SKILL,
            SynthesisStatus.NEEDS_SKILL,
            SynthesisStatus.FAILED,
        ],
    )
    return list(reasons)


# The two reads below run inside every ingest (the first always, the second for groups with a
# proposal), so they are small reads (a five-table join here cost ~3 ms of PostgreSQL planning
# per request), and written out: built by the ORM, the check costs about 2.4 times the CPU
# (0.97 against 0.40 ms a check, where a whole single-item ingest costs 3.8 ms; on 2 cores),
# as the "regression check" line of ``benchmarks/ingest_orm.py`` shows.


def source_revisions(group_ids: list[int]) -> list[tuple[int, int]]:
    """``(revision id, group id)`` of every revision proposed from these groups."""
    through = SkillRevision.source_groups.through._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT skillrevision_id, incidentgroup_id FROM {through} "
            f"WHERE incidentgroup_id IN ({placeholders(group_ids)})",
            list(group_ids),
        )
        return cursor.fetchall()


def active_revisions(project: Project, revision_ids: list[int]) -> set[int]:
    """Which of these revisions are in the project's ACTIVE policy version."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pr.skillrevision_id FROM {PolicyVersion.revisions.through._meta.db_table} pr "
            f"JOIN {PolicyVersion._meta.db_table} v ON v.id = pr.policyversion_id "
            f"WHERE v.project_id = %s AND v.status = %s "
            f"AND pr.skillrevision_id IN ({placeholders(revision_ids)})",
            [project.pk, VersionStatus.ACTIVE.value, *revision_ids],
        )
        return {revision_id for (revision_id,) in cursor.fetchall()}
