"""The approved skills most similar to a group (the LLM may revise one instead of writing a new
one), related groups, and near duplicates; with per-process caches of the vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.db import connection
from django.db.models import Exists, OuterRef, Q

from base.errors import Conflict
from base.models import Project
from incidents import services as incident_services
from incidents.models import GroupStatus, IncidentGroup
from incidents.similarity import contradiction
from skills.library.embeddings import get_embedder, skill_text
from skills.library.models import RevisionStatus, Skill, SkillRevision
from skills.synthesis.evidence import group_text, group_text_of
from skills.versions.models import PolicyVersion, VersionStatus

logger = logging.getLogger(__name__)

MAX_SIMILAR_SKILLS = 5
MAX_RELATED_GROUPS = 10


def _threshold(name: str, default: float) -> float:
    return float(getattr(settings, "METACLAW", {}).get(name, default))


def duplicate_threshold() -> float:
    """A proposed skill at least this similar (cosine) to an existing one becomes a revision."""
    return _threshold("SKILL_DUPLICATE_THRESHOLD", 0.85)


def related_threshold() -> float:
    """Groups at least this similar are linked as the same problem in other words."""
    return _threshold("GROUP_RELATED_THRESHOLD", 0.7)


@dataclass
class KnownSkill:
    skill_id: int
    slug: str
    revision: SkillRevision
    score: float
    active: bool = False
    rolled_back: list[SkillRevision] = field(default_factory=list)


# --- Similar skills and groups --------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """The revision that stands for a skill now (its newest approved or proposed one), in the
    few columns ranking needs; full rows are loaded only for the top matches."""

    revision_id: int
    skill_id: int
    slug: str
    category: str


REVISIONS = SkillRevision._meta.db_table
SKILLS = Skill._meta.db_table


def latest_revisions(project: Project) -> list[Standing]:
    """The revision that stands for each of the project's skills: its newest approved or
    proposed one."""
    rows = SkillRevision.objects.filter(
        skill__project=project,
        status__in=[RevisionStatus.APPROVED, RevisionStatus.PROPOSED],
    ).order_by("skill_id", "-number")
    if connection.features.can_distinct_on_fields:
        # One row per skill from PostgreSQL, however many revisions each has piled up (a skill
        # revised after every regression); elsewhere the first row of each skill is kept below.
        rows = rows.distinct("skill_id")
    rows = rows.values_list("id", "skill_id", "skill__slug", "skill__category")[:5000]
    latest: dict[int, Standing] = {}
    for revision_id, skill_id, slug, category in rows:
        if skill_id not in latest:
            latest[skill_id] = Standing(revision_id, skill_id, slug, category)
    return list(latest.values())


# Revisions are immutable, so their vectors can be kept for the life of the worker process.
_revision_vector_cache: dict[tuple[str, int], np.ndarray] = {}
_group_vector_cache: dict[tuple[str, int, str], np.ndarray] = {}
_CACHE_LIMIT = 50_000


def revision_vector_cache_put(embedder_name: str, revision_id: int, vector: list[float]) -> None:
    if len(_revision_vector_cache) > _CACHE_LIMIT:
        _revision_vector_cache.clear()
    _revision_vector_cache[(embedder_name, revision_id)] = np.asarray(vector, dtype=np.float32)


def _revision_vectors(revision_ids: list[int]) -> np.ndarray:
    embedder = get_embedder()
    missing = [pk for pk in revision_ids if (embedder.name, pk) not in _revision_vector_cache]
    if missing:
        if len(_revision_vector_cache) > _CACHE_LIMIT:
            _revision_vector_cache.clear()
        to_embed: list[tuple[int, str]] = []
        for pk, vector, name, description, instructions in SkillRevision.objects.filter(
            pk__in=missing
        ).values_list("id", "embedding", "name", "description", "instructions"):
            if vector and len(vector) == embedder.dim:
                _revision_vector_cache[(embedder.name, pk)] = np.asarray(vector, dtype=np.float32)
            else:
                to_embed.append((pk, skill_text(name, description, instructions)))
        if to_embed:
            vectors = embedder.embed([text for _, text in to_embed])
            for (pk, _), vector in zip(to_embed, vectors, strict=True):
                _revision_vector_cache[(embedder.name, pk)] = vector
    if not revision_ids:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack([_revision_vector_cache[(embedder.name, pk)] for pk in revision_ids])


def group_vectors(groups: list[tuple[int, str]]) -> np.ndarray:
    """Vectors of ``(group id, group text)`` pairs, cached per process."""
    embedder = get_embedder()
    keys = [(embedder.name, pk, text) for pk, text in groups]
    missing = [i for i, key in enumerate(keys) if key not in _group_vector_cache]
    if missing:
        if len(_group_vector_cache) > _CACHE_LIMIT:
            _group_vector_cache.clear()
        for i, vector in zip(missing, embedder.embed([keys[i][2] for i in missing]), strict=True):
            _group_vector_cache[keys[i]] = vector
    if not keys:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack([_group_vector_cache[key] for key in keys])


def similar_skills(
    project: Project,
    standing: list[Standing],
    group_vector: np.ndarray,
    regressed: SkillRevision | None,
) -> list[KnownSkill]:
    candidates = list(standing)
    if regressed is not None and all(c.skill_id != regressed.skill_id for c in candidates):
        candidates.append(
            Standing(
                regressed.pk, regressed.skill_id, regressed.skill.slug, regressed.skill.category
            )
        )
    if not candidates:
        return []
    scores = _revision_vectors([c.revision_id for c in candidates]) @ group_vector
    order = [int(i) for i in np.argsort(-scores)[:MAX_SIMILAR_SKILLS]]
    if regressed is not None:
        index = next(i for i, c in enumerate(candidates) if c.skill_id == regressed.skill_id)
        order = [index] + [i for i in order if i != index][: MAX_SIMILAR_SKILLS - 1]
    top_ids = [candidates[i].revision_id for i in order]
    top_skill_ids = [candidates[i].skill_id for i in order]
    # One query for the top matches (is each in the active policy?) and the rolled-back
    # revisions of their skills: the prompt shows both.
    active = PolicyVersion.objects.filter(
        project=project, status=VersionStatus.ACTIVE, revisions=OuterRef("pk")
    )
    rows = list(
        SkillRevision.objects.filter(
            Q(pk__in=top_ids) | Q(skill_id__in=top_skill_ids, rolled_back_at__isnull=False)
        )
        .only(
            "id",
            "skill_id",
            "number",
            "name",
            "description",
            "instructions",
            "status",
            "rolled_back_at",
        )  # fmt: skip
        .annotate(in_active_policy=Exists(active))
    )
    by_id = {row.pk: row for row in rows}
    known = [
        KnownSkill(
            skill_id=candidates[i].skill_id,
            slug=candidates[i].slug,
            revision=by_id[candidates[i].revision_id],
            score=float(scores[i]),
            active=bool(by_id[candidates[i].revision_id].in_active_policy),
        )
        for i in order
        if candidates[i].revision_id in by_id
    ]
    rolled_back = sorted(
        (row for row in rows if row.rolled_back_at is not None),
        key=lambda row: row.rolled_back_at,
        reverse=True,
    )
    for revision in rolled_back:
        for item in known:
            if item.skill_id == revision.skill_id:
                item.rolled_back.append(revision)
    return known


def _group_text(title: str, normalized_message: str) -> str:
    return normalized_message or title


def link_related_groups(group: IncidentGroup, vector: np.ndarray) -> None:
    """Link the groups that look like the same problem in other words: a similar description,
    the same decisive tool, and nothing one says that the other denies ("cancelled wrongly" is
    not related to "failed to cancel", however alike the words)."""
    others = list(
        IncidentGroup.objects.filter(
            project_id=group.project_id, merged_into__isnull=True, tool_name=group.tool_name
        )
        .exclude(pk=group.pk)
        .order_by("-last_seen")
        .values_list("id", "title", "tool_name")[:500]
    )
    if not others:
        return
    scores = (
        group_vectors([(pk, group_text_of(title, tool)) for pk, title, tool in others]) @ vector
    )
    threshold = related_threshold()
    text = group_text(group)
    related = [
        others[i][0]
        for i in np.argsort(-scores)[:MAX_RELATED_GROUPS]
        if float(scores[i]) >= threshold
        and contradiction(text, group_text_of(others[i][1], others[i][2])) is None
    ]
    incident_services.groups_relate(group_id=group.pk, related_ids=related)


# --- Merging a new group into the group of its failure mode ---------------------------------


def merge_threshold(project: Project) -> float:
    """Cosine similarity at which a new group joins an open group of the same failure mode:
    the project's own setting, else the site's (``GROUP_MERGE_THRESHOLD``). The default comes
    from ``benchmarks/grouping.py`` on the labelled airline corpus."""
    return project.group_merge_threshold or _threshold("GROUP_MERGE_THRESHOLD", 0.55)


@dataclass(frozen=True)
class MergeMatch:
    target: IncidentGroup
    score: float
    threshold: float


def similar_group_to_merge(group: IncidentGroup) -> MergeMatch | None:
    """The older open group of the same agent, kind, error type and decisive tool whose every
    fingerprint (the group's own and those merged into it) describes the failure like this
    group does: complete linkage, so that a group never grows by a chain of near neighbours.
    None when no group is similar enough."""
    if group.merged_into_id is not None:
        return None
    candidates = list(
        IncidentGroup.objects.filter(
            project_id=group.project_id,
            agent_name=group.agent_name,
            kind=group.kind,
            error_type=group.error_type,
            tool_name=group.tool_name,
            merged_into__isnull=True,
            pk__lt=group.pk,
        )
        .exclude(status=GroupStatus.IGNORED)
        .order_by("-last_seen")[:200]
    )
    if not candidates:
        return None
    members: dict[int, list[tuple[int, str]]] = {
        c.pk: [(c.pk, _group_text(c.title, c.normalized_message))] for c in candidates
    }
    for pk, root, title, message in IncidentGroup.objects.filter(
        merged_into_id__in=list(members)
    ).values_list("id", "merged_into_id", "title", "normalized_message"):
        members[root].append((pk, _group_text(title, message)))
    text = _group_text(group.title, group.normalized_message)
    vector = group_vectors([(group.pk, text)])[0]
    threshold = merge_threshold(group.project)
    best: MergeMatch | None = None
    for candidate in candidates:
        texts = members[candidate.pk]
        score = float(np.min(group_vectors(texts) @ vector))
        if score >= threshold and (best is None or score > best.score):
            best = MergeMatch(candidate, score, threshold)
    return best


def merge_into_similar_group(group: IncidentGroup) -> IncidentGroup | None:
    """Merge a new group into the group of its failure mode, if there is one (audited, with the
    figures). Returns the group it joined."""
    match = similar_group_to_merge(group)
    if match is None:
        return None
    try:
        return incident_services.groups_merge(
            project=group.project,
            target_id=match.target.pk,
            source_ids=[group.pk],
            actor=None,
            actor_label="fast loop: similarity merge",
            reason=(
                f"Same failure mode as group {match.target.pk}: similarity {match.score:.2f} "
                f"(at least {match.threshold:.2f}) with each of its fingerprints; same agent, kind "
                f"and decisive tool ({group.tool_name or 'none'})."
            ),
        )
    except Conflict:
        # The other group was merged elsewhere meanwhile: synthesise this one on its own.
        return None


def near_duplicate(
    standing: list[Standing], vector: np.ndarray, slug: str
) -> tuple[Standing, SkillRevision, float] | None:
    candidates = [c for c in standing if c.slug != slug]
    if not candidates:
        return None
    scores = _revision_vectors([c.revision_id for c in candidates]) @ vector
    best = int(np.argmax(scores))
    if float(scores[best]) < duplicate_threshold():
        return None
    revision = SkillRevision.objects.filter(pk=candidates[best].revision_id).first()
    return (candidates[best], revision, float(scores[best])) if revision is not None else None
