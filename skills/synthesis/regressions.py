"""A new incident in a group whose skill is live: the group is marked regressed and the skill
asked for a revision (inside the ingest transaction)."""

from __future__ import annotations

import logging
from typing import Any

from django.db import connection
from django.db.models import Q
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
    already: then the incidents are just more evidence). Runs inside the ingest transaction.
    Returns the regressed group ids."""
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
    hits = [
        (*details[revision_id], group_id)
        for revision_id, group_id in sources
        if revision_id in details
    ]
    regressed: list[int] = []
    for revision_id, skill_id, slug, approved_at, group_id in hits:
        if group_id not in group_ids:
            continue
        numbers = set(
            PolicyVersion.objects.filter(project=project, revisions=revision_id).values_list(
                "number", flat=True
            )
        )
        ran_with_skill = Incident.objects.filter(
            project=project, pk__in=incident_ids, group_id=group_id
        ).filter(
            Q(policy_version__in=numbers)
            | Q(policy_version__isnull=True, occurred_at__gte=approved_at or timezone.now())
        )
        if not ran_with_skill.exists():
            continue
        incident_services.group_mark_regressed(
            group_id=group_id,
            reason=f"A new incident arrived although the skill '{slug}' is in the active policy.",
        )
        regressed.append(group_id)
        pending = SkillRevision.objects.filter(
            skill_id=skill_id,
            status=RevisionStatus.PROPOSED,
            created_at__gt=approved_at or timezone.now(),
        )
        if not pending.exists():
            incident_services.group_request_synthesis(
                group_id=group_id,
                from_statuses=[
                    SynthesisStatus.NONE,
                    SynthesisStatus.PROPOSED,
                    SynthesisStatus.NO_SKILL,
                    SynthesisStatus.NEEDS_SKILL,
                    SynthesisStatus.FAILED,
                ],
            )
    return regressed


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
