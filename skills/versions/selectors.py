"""Tenant-scoped reads of skills, revisions and policy versions, shared by pages and the API.

Every function takes the project (from the API key or from ``project_view``) and never returns
another project's rows. List functions issue a fixed number of queries whatever the data size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import (
    Case,
    Count,
    Exists,
    F,
    FloatField,
    Func,
    IntegerField,
    Max,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Coalesce, Ln, Power

from base.errors import DomainError, NotFound
from base.models import Project
from incidents.models import SEVERITY_RANK, Incident, IncidentGroup
from skills.library.models import RevisionStatus, Skill, SkillRevision
from skills.versions import diff as diffs
from skills.versions.models import PolicyVersion, VersionStatus

# The review queue's orders: value, label (the switch on the page lists them in this order) and
# the sort. The first is the default. ``priority`` is explained in ``_priority``.
QUEUE_ORDERS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "priority": ("priority: severity × impact", ("-priority", "-impact_events", "-created_at")),
    "incidents": (
        "most incidents",
        ("-impact_events", F("impact_last_seen").desc(nulls_last=True), "-impact_severity"),
    ),
    "newest": ("newest proposal", ("-created_at",)),
    "recent": ("latest incident", (F("impact_last_seen").desc(nulls_last=True), "-created_at")),
    "severity": ("worst severity", ("-impact_severity", "-impact_events")),
    "oldest": ("oldest proposal", ("created_at",)),
}
DEFAULT_QUEUE_ORDER = "priority"
# How much a level of severity outweighs the one below it, and after how many days without an
# incident a proposal's impact counts half.
SEVERITY_STEP = 3.0
RECENCY_HALF_DAYS = 7.0
PRIORITY_FORMULA = (
    f"severity weight (low 1, medium {SEVERITY_STEP:g}, high {SEVERITY_STEP**2:g}, "
    f"critical {SEVERITY_STEP**3:g}) × (ln(1 + incidents) + ln(1 + distinct sources)) × "
    f"recency (1 / (1 + days since the last incident / {RECENCY_HALF_DAYS:g}))"
)


def revisions_for_project(
    project: Project,
    *,
    status: str | None = None,
    skill: str | None = None,
    category: str | None = None,
    origin: str | None = None,
    agent: str | None = None,
    q: str | None = None,
) -> QuerySet[SkillRevision]:
    qs = SkillRevision.objects.filter(skill__project=project)
    if status:
        qs = qs.filter(status=status)
    if skill:
        qs = qs.filter(skill__slug=skill)
    if category:
        qs = qs.filter(category=category)
    if origin:
        qs = qs.filter(origin=origin)
    if agent:
        qs = qs.filter(
            Exists(
                IncidentGroup.objects.filter(
                    skill_revisions=OuterRef("pk"), agent_name=agent, project=project
                )
            )
        )
    if q:
        qs = qs.filter(Q(name__icontains=q) | Q(skill__slug__icontains=q))
    return qs


def _severity_rank() -> Case:
    return Case(
        *[
            When(source_groups__severity=name, then=Value(rank))
            for name, rank in SEVERITY_RANK.items()
        ],
        default=Value(0),
        output_field=IntegerField(),
    )


class _DaysSince(Func):
    """Days from a time to now, never below 0 (null for null): PostgreSQL, and SQLite for the
    embedded mode (which stores UTC times as text that ``julianday`` reads)."""

    template = "GREATEST(0, EXTRACT(EPOCH FROM (NOW() - %(expressions)s)) / 86400.0)"
    output_field = FloatField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "MAX(0, julianday('now') - julianday(%(expressions)s))"
        return self.as_sql(compiler, connection, template=template, **extra)


def _priority() -> Any:
    """A proposal's priority, from the annotations of ``review_queue`` (``PRIORITY_FORMULA``):

        SEVERITY_STEP ** (worst severity rank - 1)
        × (ln(1 + incidents in its source groups) + ln(1 + distinct sources))
        × 1 / (1 + days since its groups' last incident / RECENCY_HALF_DAYS)

    Severity multiplies while the counts add in logarithms, so a critical leak with 3 incidents
    from 3 sources (27 × 2.8 = 75) stays above a low-severity chart fix with 10 incidents from
    one source (1 × 3.1): making up one level of severity takes about cubing the incidents
    (3 → 63), and a flood from one source counts less than the same number from many. Distinct
    sources are the provenance counted when it was proposed (0 before it was counted);
    proposals without evidence (written by a person, imported) score 0 and follow, newest
    first."""
    as_float = FloatField()
    severity_weight = Power(
        Value(SEVERITY_STEP), F("impact_severity") - Value(1), output_field=as_float
    )
    sources = Coalesce(Cast(KeyTextTransform("sources", "provenance"), as_float), Value(0.0))
    breadth = Ln(Cast("impact_events", as_float) + Value(1.0)) + Ln(sources + Value(1.0))
    days = Coalesce(_DaysSince("impact_last_seen"), Value(0.0))
    recency = Value(1.0) / (Value(1.0) + days / Value(RECENCY_HALF_DAYS))
    return severity_weight * breadth * recency


def queue_order_check(order: str | None) -> str:
    """The review queue's order by name (the default for none); DomainError naming ``order``
    for a name it does not know."""
    order = order or DEFAULT_QUEUE_ORDER
    if order not in QUEUE_ORDERS:
        raise DomainError(
            f"Unknown order '{order[:40]}': one of {', '.join(QUEUE_ORDERS)}.", field="order"
        )
    return order


def review_queue(
    project: Project,
    *,
    category: str | None = None,
    origin: str | None = None,
    agent: str | None = None,
    q: str | None = None,
    order: str | None = None,
    limit: int = 50,
) -> list[SkillRevision]:
    """Proposed revisions, and live ones that the effectiveness check sent back (flagged, with
    their figures), in ``order`` (``QUEUE_ORDERS``; by default ``priority``, see ``_priority``):
    each annotated with its impact (incidents, groups, last incident, worst severity rank) and
    its priority. DomainError naming ``order`` for an unknown order. One query."""
    sort = QUEUE_ORDERS[queue_order_check(order)][1]
    qs = (
        revisions_for_project(project, category=category, origin=origin, agent=agent, q=q)
        .filter(
            Q(status=RevisionStatus.PROPOSED)
            | Q(status=RevisionStatus.APPROVED, effectiveness_flagged_at__isnull=False)
        )
        .select_related("skill")
        .annotate(
            impact_events=Coalesce(Sum("source_groups__event_count"), 0),
            impact_groups=Count("source_groups"),
            impact_last_seen=Max("source_groups__last_seen"),
            impact_severity=Coalesce(Max(_severity_rank()), 0),
        )
        .annotate(priority=_priority())
        .order_by(*sort, "-id")
    )
    return list(qs[:limit])


SEVERITY_NAMES = {rank: name for name, rank in SEVERITY_RANK.items()}


def revision_for_project(project: Project, revision_id: Any) -> SkillRevision:
    revision = (
        SkillRevision.objects.filter(skill__project=project, pk=revision_id)
        .select_related("skill", "created_by", "decided_by", "first_approved_by", "parent")
        .first()
    )
    if revision is None:
        raise NotFound("No such skill revision in this project.")
    return revision


def active_version(project: Project) -> PolicyVersion | None:
    return PolicyVersion.objects.filter(project=project, status=VersionStatus.ACTIVE).first()


def live_revision_for_skill(project: Project, skill_id: int) -> SkillRevision | None:
    """The revision of the skill that agents run with now: the one in the active version (after
    a rollback that may be an older one), else none. One query."""
    return (
        SkillRevision.objects.filter(
            skill_id=skill_id,
            policy_versions__project=project,
            policy_versions__status=VersionStatus.ACTIVE,
        )
        .select_related("skill")
        .first()
    )


@dataclass
class ProposalDetail:
    revision: SkillRevision
    live: SkillRevision | None
    changes: list[diffs.FieldDiff]
    groups: list[IncidentGroup]
    incidents: list[Incident]
    history: list[SkillRevision]
    # The version this revision first went live in (its approval made it), if it ever did.
    made_version: PolicyVersion | None = None


EVIDENCE_INCIDENTS = 5


def proposal_detail(project: Project, revision_id: Any) -> ProposalDetail:
    """Everything the proposal page shows, in a fixed number of queries (6)."""
    revision = revision_for_project(project, revision_id)
    live = live_revision_for_skill(project, revision.skill_id)
    if live is not None and live.pk == revision.pk:
        live = None
    if live is not None:
        changes = diffs.revision_changes(live, revision)
    else:
        changes = [
            diffs.FieldDiff(name, "", str(getattr(revision, name)))
            for name in ("name", "description", "instructions")
        ]
    groups = list(
        IncidentGroup.objects.filter(project=project, skill_revisions=revision).order_by(
            "-event_count"
        )[:20]
    )
    incidents = list(
        Incident.objects.filter(project=project, skill_revisions=revision).order_by("-occurred_at")[
            :EVIDENCE_INCIDENTS
        ]
    )
    history = list(
        SkillRevision.objects.filter(skill_id=revision.skill_id)
        .only("id", "number", "status", "author", "origin", "created_at", "skill_id", "name")
        .order_by("-number")[:20]
    )
    made_version = (
        PolicyVersion.objects.filter(project=project, revisions=revision)
        .exclude(status__in=[VersionStatus.CANDIDATE, VersionStatus.REJECTED])
        .order_by("number")
        .first()
        if revision.status != "proposed"
        else None
    )
    return ProposalDetail(revision, live, changes, groups, incidents, history, made_version)


def versions_for_project(project: Project, *, status: str | None = None) -> QuerySet[PolicyVersion]:
    qs = (
        PolicyVersion.objects.filter(project=project)
        .select_related("parent", "created_by")
        .annotate(skill_count=Count("revisions"))
        .order_by("-number")
    )
    if status:
        qs = qs.filter(status=status)
    return qs


def version_for_project(project: Project, number: Any) -> PolicyVersion:
    try:
        number = int(number)
    except (TypeError, ValueError) as exc:
        raise NotFound("No such policy version in this project.") from exc
    version = (
        PolicyVersion.objects.filter(project=project, number=number)
        .select_related("parent", "created_by")
        .first()
    )
    if version is None:
        raise NotFound("No such policy version in this project.")
    return version


def version_revisions(version: PolicyVersion) -> list[SkillRevision]:
    return list(version.revisions.select_related("skill").order_by("skill__slug"))


def version_replaced(version: PolicyVersion) -> int | None:
    """The number of the version that ``version``'s latest release replaced (the one a
    promotion or rollback retired), or None. One query."""
    from skills.versions.models import Release

    return (
        Release.objects.filter(to_version=version)
        .order_by("-created_at", "-id")
        .values_list("from_version__number", flat=True)
        .first()
    )


def revisions_by_id(project: Project, ids: list[Any]) -> list[SkillRevision]:
    """The project's revisions with these ids, in that order; a DomainError on ``revisions``
    names any id that is not one of them (another project's included). One query."""
    try:
        wanted = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise DomainError("Revisions are given by id.", field="revisions") from exc
    found = SkillRevision.objects.filter(skill__project=project).select_related("skill")
    by_id = found.in_bulk(wanted) if wanted else {}
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise DomainError(
            f"No revision {', '.join(map(str, missing))} in this project.", field="revisions"
        )
    return [by_id[i] for i in wanted]


@dataclass
class ComposeChoice:
    """One skill on the compose page: the revisions a candidate may hold (approved ones,
    newest first) and the one live now, if any."""

    skill: Skill
    revisions: list[SkillRevision]
    live_id: int | None


def compose_choices(project: Project) -> tuple[list[ComposeChoice], list[str]]:
    """What an admin may compose a candidate from: per skill, its approved revisions (APPROVED
    now or held by a version that was active, as ``policy_version_create_candidate`` requires),
    and the adapters the project's versions used. Four queries."""
    active = active_version(project)
    live = set(active.revisions.values_list("pk", flat=True)) if active else set()
    revisions = (
        SkillRevision.objects.filter(skill__project=project)
        .filter(
            Q(status=RevisionStatus.APPROVED)
            | Q(policy_versions__status__in=[VersionStatus.ACTIVE, VersionStatus.RETIRED])
        )
        .distinct()
        .select_related("skill")
        .only(
            "id", "number", "name", "status", "rolled_back_at", "created_at", "skill__id",
            "skill__slug", "skill__project_id", "skill__category", "skill__created_at",
        )
        .order_by("skill__slug", "-number")
    )  # fmt: skip
    choices: list[ComposeChoice] = []
    for revision in revisions:
        if not choices or choices[-1].skill.pk != revision.skill_id:
            choices.append(ComposeChoice(revision.skill, [], None))
        choices[-1].revisions.append(revision)
        if revision.pk in live:
            choices[-1].live_id = revision.pk
    adapters = list(
        PolicyVersion.objects.filter(project=project)
        .exclude(adapter_ref="")
        .order_by("-number")
        .values_list("adapter_ref", flat=True)[:200]
    )
    return choices, list(dict.fromkeys(adapters))


def version_releases(version: PolicyVersion) -> list[Any]:
    from skills.versions.models import Release

    return list(
        Release.objects.filter(Q(to_version=version) | Q(from_version=version))
        .select_related("from_version", "to_version", "actor")
        .order_by("-created_at", "-id")[:20]
    )


@dataclass(frozen=True)
class _Unchanged:
    """A revision both versions hold: the diff needs only its identity, so it is not loaded."""

    pk: int
    skill_id: int


def versions_diff(project: Project, from_number: Any, to_number: Any) -> diffs.VersionDiff:
    """Diff two versions of the project in four queries whatever their size: the two versions,
    the (version, revision, skill) triples of both, and the full rows of the revisions that
    differ (unchanged ones are never loaded)."""
    old = version_for_project(project, from_number)
    new = version_for_project(project, to_number)
    triples = PolicyVersion.revisions.through.objects.filter(
        policyversion_id__in=[old.pk, new.pk]
    ).values_list("policyversion_id", "skillrevision_id", "skillrevision__skill_id")
    before: dict[int, int] = {}
    after: dict[int, int] = {}
    for version_id, revision_id, skill_id in triples:
        if version_id == old.pk:
            before[skill_id] = revision_id
        if version_id == new.pk:
            after[skill_id] = revision_id
    differing = {r for s, r in before.items() if after.get(s) != r}
    differing |= {r for s, r in after.items() if before.get(s) != r}
    loaded = SkillRevision.objects.select_related("skill").in_bulk(differing) if differing else {}

    def rows(mapping: dict[int, int]) -> list[Any]:
        return [loaded.get(r) or _Unchanged(r, s) for s, r in mapping.items()]

    return diffs.version_diff(old, new, rows(before), rows(after))


def skills_library(project: Project, *, q: str | None = None) -> QuerySet[Skill]:
    """Every skill with its revisions (newest first) and, on each revision, the versions that
    contain it. Three queries for any page of skills."""
    versions = PolicyVersion.objects.only("id", "number", "status").order_by("number")
    revisions = (
        SkillRevision.objects.only(
            "id", "skill_id", "number", "name", "status", "author", "origin", "created_at",
            "rolled_back_at",
        )
        .order_by("-number")
        .prefetch_related(Prefetch("policy_versions", queryset=versions))
    )  # fmt: skip
    qs = Skill.objects.filter(project=project).order_by("slug")
    if q:
        qs = qs.filter(Q(slug__icontains=q) | Q(revisions__name__icontains=q)).distinct()
    return qs.prefetch_related(Prefetch("revisions", queryset=revisions))
