"""The approved skills most similar to a group (the LLM may revise one instead of writing a new
one), related groups, and near duplicates; with per-process caches of the vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from django.conf import settings
from django.db import connection

from base.models import Project
from base.sql import columns, placeholders
from incidents import services as incident_services
from incidents.models import IncidentGroup
from skills.library.embeddings import get_embedder, skill_text
from skills.library.models import RevisionStatus, Skill, SkillRevision
from skills.synthesis.evidence import group_text_of
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


# The reads below run in every synthesis, so they are written out: the ORM spent more CPU
# compiling each of them than PostgreSQL spent running it (the fast loop's throughput under a
# burst of new groups is CPU-bound). Table names come from the models; the SQL is portable.
REVISIONS = SkillRevision._meta.db_table
SKILLS = Skill._meta.db_table


def latest_revisions(project: Project) -> list[Standing]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT r.id, r.skill_id, s.slug, s.category FROM {REVISIONS} r "
            f"JOIN {SKILLS} s ON s.id = r.skill_id "
            "WHERE s.project_id = %s AND r.status IN (%s, %s) "
            "ORDER BY r.skill_id, r.number DESC LIMIT 5000",
            [project.pk, RevisionStatus.APPROVED.value, RevisionStatus.PROPOSED.value],
        )
        rows = cursor.fetchall()
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
    rows = list(
        SkillRevision.objects.raw(
            "SELECT r.id, r.skill_id, r.number, r.name, r.description, r.instructions, "
            "r.status, r.rolled_back_at, EXISTS (SELECT 1 FROM "
            f"{PolicyVersion.revisions.through._meta.db_table} pr "
            f"JOIN {PolicyVersion._meta.db_table} v ON v.id = pr.policyversion_id "
            "WHERE pr.skillrevision_id = r.id AND v.project_id = %s AND v.status = %s"
            f") AS in_active_policy FROM {REVISIONS} r WHERE r.id IN ({placeholders(top_ids)}) "
            f"OR (r.skill_id IN ({placeholders(top_skill_ids)}) AND r.rolled_back_at IS NOT NULL)",
            [project.pk, VersionStatus.ACTIVE.value, *top_ids, *top_skill_ids],
        )
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


def link_related_groups(group: IncidentGroup, vector: np.ndarray) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, title, tool_name FROM {IncidentGroup._meta.db_table} "
            "WHERE project_id = %s AND id <> %s ORDER BY last_seen DESC LIMIT 500",
            [group.project_id, group.pk],
        )
        others = [(pk, group_text_of(title, tool)) for pk, title, tool in cursor.fetchall()]
    if not others:
        return
    scores = group_vectors(others) @ vector
    threshold = related_threshold()
    related = [
        others[i][0]
        for i in np.argsort(-scores)[:MAX_RELATED_GROUPS]
        if float(scores[i]) >= threshold
    ]
    incident_services.groups_relate(group_id=group.pk, related_ids=related)


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
    revision = next(
        iter(
            SkillRevision.objects.raw(
                f"SELECT {columns(SkillRevision)} FROM {REVISIONS} WHERE id = %s",
                [candidates[best].revision_id],
            )
        ),
        None,
    )
    return (candidates[best], revision, float(scores[best])) if revision is not None else None
