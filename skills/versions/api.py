"""Admin API for reviews and policy versions (admins and CI pipelines, ``admin`` keys).

Thin handlers: reads through ``skills.versions.selectors``, decisions through the same services the
dashboard and the approval links call. The key's project scopes everything; the actor is the
key itself (``api-key:<prefix>``), whose permission the ``admin`` scope has checked."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status

from base.auth import admin_auth
from base.pagination import paginate
from skills.library.models import Category, Origin, RevisionStatus, SkillRevision
from skills.versions import selectors, services
from skills.versions.models import PolicyVersion, VersionStatus

# Schemas live here rather than in skills/schemas.py: that module belongs to the runtime API.

# Operation ids as before this module moved into skills.versions (see metaclaw_site.api).
OPENAPI_OPERATION_PREFIX = "skills_api"

router = Router(tags=["reviews and versions"], auth=admin_auth)


def _actor_label(request: HttpRequest) -> str:
    return f"api-key:{request.api_key.prefix}"  # type: ignore[attr-defined]


class RevisionOut(Schema):
    id: int
    skill: str
    number: int
    name: str
    description: str
    instructions: str
    category: str
    examples: list
    author: str
    origin: str
    status: str
    parent_id: int | None
    diagnosis: str
    decision_reason: str
    rolled_back_at: datetime | None
    created_at: datetime
    status_changed_at: datetime | None

    @staticmethod
    def resolve_skill(obj: SkillRevision) -> str:
        return obj.skill.slug


class RevisionPage(Schema):
    items: list[RevisionOut]
    next_cursor: str | None


class RevisionFilter(Schema):
    status: RevisionStatus | None = None
    skill: str | None = None
    category: Category | None = None
    origin: Origin | None = None
    cursor: str | None = None
    limit: int = Field(50, ge=1, le=200)


class DecisionIn(Schema):
    reason: str = Field("", max_length=2000)


class ReasonIn(Schema):
    reason: str = Field(..., max_length=2000)


class EditIn(Schema):
    name: str = Field(..., max_length=120)
    description: str = Field(..., max_length=500)
    instructions: str = Field(..., max_length=20_000)
    category: Category = Category.GENERAL
    examples: list | None = None
    approve: bool = False


class VersionOut(Schema):
    id: int
    number: int
    status: str
    parent: int | None
    adapter_ref: str
    base_model: str
    changelog: str
    skill_count: int
    created_at: datetime
    status_changed_at: datetime | None
    rolled_back_at: datetime | None

    @staticmethod
    def resolve_parent(obj: PolicyVersion) -> int | None:
        return obj.parent.number if obj.parent_id else None

    @staticmethod
    def resolve_skill_count(obj: Any) -> int:
        if hasattr(obj, "skill_count"):
            return obj.skill_count
        return len(getattr(obj, "revision_list", []))


class VersionRevisionOut(Schema):
    id: int
    skill: str
    number: int
    name: str

    @staticmethod
    def resolve_skill(obj: SkillRevision) -> str:
        return obj.skill.slug


class VersionDetailOut(VersionOut):
    revisions: list[VersionRevisionOut]

    @staticmethod
    def resolve_revisions(obj: Any) -> list[SkillRevision]:
        return obj.revision_list


def _revision(request: HttpRequest, revision_id: int) -> SkillRevision:
    return selectors.revision_for_project(request.project, revision_id)  # type: ignore[attr-defined]


def _version(request: HttpRequest, number: int) -> PolicyVersion:
    return selectors.version_for_project(request.project, number)  # type: ignore[attr-defined]


def _version_detail(request: HttpRequest, number: int) -> PolicyVersion:
    version = _version(request, number)
    version.revision_list = selectors.version_revisions(version)  # type: ignore[attr-defined]
    return version


@router.get("/skills/revisions", response=RevisionPage)
def list_revisions(request: HttpRequest, filters: Query[RevisionFilter]) -> dict:
    qs = selectors.revisions_for_project(
        request.project,  # type: ignore[attr-defined]
        status=filters.status,
        skill=filters.skill,
        category=filters.category,
        origin=filters.origin,
    ).select_related("skill")
    items, next_cursor = paginate(
        qs, time_field="created_at", cursor=filters.cursor, limit=filters.limit
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/skills/revisions/{revision_id}", response=RevisionOut)
def get_revision(request: HttpRequest, revision_id: int) -> SkillRevision:
    return _revision(request, revision_id)


@router.post("/skills/revisions/{revision_id}/approve", response=RevisionOut)
def approve_revision(
    request: HttpRequest, revision_id: int, payload: DecisionIn | None = None
) -> SkillRevision:
    return services.skill_revision_approve(
        revision=_revision(request, revision_id),
        actor=None,
        actor_label=_actor_label(request),
        reason=payload.reason if payload else "",
    )


@router.post("/skills/revisions/{revision_id}/reject", response=RevisionOut)
def reject_revision(request: HttpRequest, revision_id: int, payload: ReasonIn) -> SkillRevision:
    return services.skill_revision_reject(
        revision=_revision(request, revision_id),
        actor=None,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )


@router.post("/skills/revisions/{revision_id}/edit", response={201: RevisionOut})
def edit_revision(request: HttpRequest, revision_id: int, payload: EditIn) -> Status:
    """A new proposed revision with the edited text (the edited one is superseded); with
    ``approve: true`` it is approved at once."""
    label = _actor_label(request)
    new_revision = services.skill_revision_edit(
        revision=_revision(request, revision_id),
        actor=None,
        actor_label=label,
        name=payload.name,
        description=payload.description,
        instructions=payload.instructions,
        category=payload.category,
        examples=payload.examples,
    )
    if payload.approve:
        new_revision = services.skill_revision_approve(
            revision=new_revision, actor=None, actor_label=label
        )
    return Status(201, new_revision)


@router.get("/versions", response=list[VersionOut])
def list_versions(request: HttpRequest, status: VersionStatus | None = None) -> list:
    return list(selectors.versions_for_project(request.project, status=status)[:200])  # type: ignore[attr-defined]


@router.get("/versions/{number}", response=VersionDetailOut)
def get_version(request: HttpRequest, number: int) -> PolicyVersion:
    return _version_detail(request, number)


@router.get("/versions/{from_number}/diff/{to_number}")
def diff_versions(request: HttpRequest, from_number: int, to_number: int) -> dict:
    """Skills added, removed and changed (with a word-level diff), adapter and base model."""
    return selectors.versions_diff(
        request.project,  # type: ignore[attr-defined]
        from_number,
        to_number,
    ).as_dict()


@router.post("/versions/{number}/promote", response=VersionDetailOut)
def promote_version(
    request: HttpRequest, number: int, payload: DecisionIn | None = None
) -> PolicyVersion:
    services.policy_version_promote(
        version=_version(request, number),
        actor=None,
        actor_label=_actor_label(request),
        reason=payload.reason if payload else "",
    )
    return _version_detail(request, number)


@router.post("/versions/{number}/reject", response=VersionDetailOut)
def reject_version(request: HttpRequest, number: int, payload: ReasonIn) -> PolicyVersion:
    services.policy_version_reject(
        version=_version(request, number),
        actor=None,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )
    return _version_detail(request, number)


@router.post("/versions/{number}/rollback", response=VersionDetailOut)
def rollback_to_version(request: HttpRequest, number: int, payload: ReasonIn) -> PolicyVersion:
    """Make the retired version ``number`` active again."""
    services.policy_version_rollback(
        to_version=_version(request, number),
        actor=None,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )
    return _version_detail(request, number)
