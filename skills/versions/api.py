"""Admin API for reviews and policy versions (admins and CI pipelines, ``admin`` keys).

Thin handlers: reads through ``skills.versions.selectors``, decisions through the same services the
dashboard and the approval links call. The key's project scopes everything; the actor is the
key itself (``api-key:<prefix>``), whose permission the ``admin`` scope has checked; for the
two-person rule an approval counts as the key's owner (``base.permissions.person_id``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from ninja import Field, Query, Router, Schema, Status

from base.auth import admin_auth
from base.pagination import paginate
from base.permissions import api_key_label
from base.requests import ApiRequest
from base.sanitize import CleanText
from skills.library.models import Category, Origin, RevisionStatus, SkillRevision
from skills.library.risk import is_flagged
from skills.library.services import CONTENT_LIMITS
from skills.versions import selectors, services
from skills.versions.models import PolicyVersion, VersionStatus

# Schemas live here rather than in skills/schemas.py: that module belongs to the runtime API.

# Operation ids as before this module moved into skills.versions (see metaclaw_site.api).
OPENAPI_OPERATION_PREFIX = "skills_api"

router = Router(tags=["reviews and versions"], auth=admin_auth)


class RiskFindingOut(Schema):
    kind: str
    severity: str
    field: str
    start: int
    end: int
    text: str
    message: str


class _SkillSlugOut(Schema):
    """A revision's ``skill`` field is its skill's slug (declared by each schema, in its order)."""

    @staticmethod
    def resolve_skill(obj: SkillRevision) -> str:
        return obj.skill.slug


class RevisionOut(_SkillSlugOut):
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
    # The risk check (skills.library.risk): flagged revisions need override_reason to approve.
    risk_flagged: bool
    risk_findings: list[RiskFindingOut]
    risk_checked_at: datetime | None
    # The LLM judge (skills.library.judge): "" (predates it), skipped (no LLM), pending,
    # running, passed, failed or unavailable; ``judge``: the rubric with each verdict and reason.
    judge_status: str
    judge: dict
    # Distinct sessions, end users, agents, API keys and sources behind the evidence, as
    # counted when it was proposed (issue 22): {} for revisions without source groups.
    provenance: dict

    @staticmethod
    def resolve_risk_flagged(obj: SkillRevision) -> bool:
        return is_flagged(obj.risk_findings)

    @staticmethod
    def resolve_judge(obj: SkillRevision) -> dict:
        return obj.judge_summary()

    @staticmethod
    def resolve_provenance(obj: SkillRevision) -> dict:
        return obj.provenance or {}


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


class ReviewQueueItemOut(RevisionOut):
    # The figures the order is computed from (skills.versions.selectors.review_queue).
    priority: float
    impact_events: int
    impact_groups: int
    impact_last_seen: datetime | None
    worst_severity: str | None

    @staticmethod
    def resolve_worst_severity(obj: Any) -> str | None:
        return selectors.SEVERITY_NAMES.get(obj.impact_severity)


class ReviewQueueOut(Schema):
    order: str
    # What the order means, in words: for "priority", the formula.
    order_explained: str
    items: list[ReviewQueueItemOut]


QueueOrder = Literal[tuple(selectors.QUEUE_ORDERS)]  # type: ignore[valid-type]


class ReviewQueueFilter(Schema):
    # Unknown orders are refused (422 naming "order"); the page offers the same ones.
    order: QueueOrder = selectors.DEFAULT_QUEUE_ORDER
    category: Category | None = None
    origin: Origin | None = None
    agent: CleanText | None = Field(None, max_length=200)
    q: CleanText | None = Field(None, max_length=200)
    limit: int = Field(50, ge=1, le=200)


class DecisionIn(Schema):
    reason: CleanText = Field("", max_length=2000)


class ApproveIn(DecisionIn):
    # Required when the risk check flagged the revision (422 naming it otherwise).
    override_reason: CleanText = Field("", max_length=2000)


class ReasonIn(Schema):
    reason: CleanText = Field(..., max_length=2000)


class EditIn(Schema):
    # A revision may hold what the Agent Skills format allows (imported skills do), not only
    # what the fast loop writes: skills.library.services.CONTENT_LIMITS.
    name: CleanText = Field(..., max_length=CONTENT_LIMITS["name"])
    description: CleanText = Field(..., max_length=CONTENT_LIMITS["description"])
    instructions: CleanText = Field(..., max_length=CONTENT_LIMITS["instructions"])
    category: Category = Category.GENERAL
    examples: list | None = None
    approve: bool = False
    override_reason: CleanText = Field("", max_length=2000)


class PromoteIn(DecisionIn):
    # The version the caller means to replace (the one active when they decided): the promotion
    # is refused (409) when another one is active by now. Without it, the candidate's parent
    # must still be active.
    replaces: int | None = Field(None, ge=1)


class VersionIn(Schema):
    """A candidate to compose. ``revisions``: ids of approved revisions, at most one per skill
    (omitted: the active version's); ``adapter_ref`` and ``base_model`` omitted: the active
    version's ("" for none)."""

    revisions: list[int] | None = Field(None, max_length=2000)
    adapter_ref: CleanText | None = Field(None, max_length=500)
    base_model: CleanText | None = Field(None, max_length=200)
    changelog: CleanText = Field("", max_length=5000)


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


class VersionRevisionOut(_SkillSlugOut):
    id: int
    skill: str
    number: int
    name: str


class VersionDetailOut(VersionOut):
    revisions: list[VersionRevisionOut]

    @staticmethod
    def resolve_revisions(obj: Any) -> list[SkillRevision]:
        return obj.revision_list


class VersionDecidedOut(VersionDetailOut):
    # The version a promotion or rollback replaced (now retired): what the caller just retired.
    replaced: int | None = None

    @staticmethod
    def resolve_replaced(obj: Any) -> int | None:
        return getattr(obj, "replaced", None)


def _revision(request: ApiRequest, revision_id: int) -> SkillRevision:
    return selectors.revision_for_project(request.project, revision_id)


def _version(request: ApiRequest, number: int) -> PolicyVersion:
    return selectors.version_for_project(request.project, number)


def _version_detail(request: ApiRequest, number: int) -> PolicyVersion:
    version = _version(request, number)
    version.revision_list = selectors.version_revisions(version)  # type: ignore[attr-defined]
    return version


@router.get("/skills/revisions", response=RevisionPage)
def list_revisions(request: ApiRequest, filters: Query[RevisionFilter]) -> dict:
    qs = selectors.revisions_for_project(
        request.project,
        status=filters.status,
        skill=filters.skill,
        category=filters.category,
        origin=filters.origin,
    ).select_related("skill")
    items, next_cursor = paginate(
        qs, time_field="created_at", cursor=filters.cursor, limit=filters.limit
    )
    return {"items": items, "next_cursor": next_cursor}


@router.get("/skills/review-queue", response=ReviewQueueOut)
def review_queue(request: ApiRequest, filters: Query[ReviewQueueFilter]) -> dict:
    """What waits for review, in the dashboard's order: by default ``priority`` (severity ×
    impact, ``order_explained`` gives the formula), else ``incidents``, ``newest``,
    ``recent`` (latest incident), ``severity`` or ``oldest``. Not paged: the first ``limit``."""
    items = selectors.review_queue(
        request.project,
        category=filters.category,
        origin=filters.origin,
        agent=filters.agent or None,
        q=filters.q or None,
        order=filters.order,
        limit=filters.limit,
    )
    label = selectors.QUEUE_ORDERS[filters.order][0]
    if filters.order == "priority":
        label = f"{label} = {selectors.PRIORITY_FORMULA}"
    return {"order": filters.order, "order_explained": label, "items": items}


@router.get("/skills/revisions/{revision_id}", response=RevisionOut)
def get_revision(request: ApiRequest, revision_id: int) -> SkillRevision:
    return _revision(request, revision_id)


@router.post("/skills/revisions/{revision_id}/approve", response=RevisionOut)
def approve_revision(
    request: ApiRequest, revision_id: int, payload: ApproveIn | None = None
) -> SkillRevision:
    return services.skill_revision_approve(
        revision=_revision(request, revision_id),
        actor=None,
        api_key=request.api_key,
        reason=payload.reason if payload else "",
        override_reason=payload.override_reason if payload else "",
    )


@router.post("/skills/revisions/{revision_id}/reject", response=RevisionOut)
def reject_revision(request: ApiRequest, revision_id: int, payload: ReasonIn) -> SkillRevision:
    return services.skill_revision_reject(
        revision=_revision(request, revision_id),
        actor=None,
        actor_label=api_key_label(request.api_key),
        reason=payload.reason,
    )


@router.post("/skills/revisions/{revision_id}/edit", response={201: RevisionOut})
def edit_revision(request: ApiRequest, revision_id: int, payload: EditIn) -> Status:
    """A new proposed revision with the edited text (the edited one is superseded); with
    ``approve: true`` it is approved at once."""
    label = api_key_label(request.api_key)
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
            revision=new_revision,
            actor=None,
            actor_label=label,
            api_key=request.api_key,
            override_reason=payload.override_reason,
        )
    return Status(201, new_revision)


@router.get("/versions", response=list[VersionOut])
def list_versions(request: ApiRequest, status: VersionStatus | None = None) -> list:
    return list(selectors.versions_for_project(request.project, status=status)[:200])


@router.post("/versions", response={201: VersionDetailOut})
def create_version(request: ApiRequest, payload: VersionIn) -> Status:
    """Compose a candidate from chosen approved revisions and an adapter, built on the active
    version; it waits for ``promote`` (or ``reject``)."""
    chosen = payload.revisions
    revisions = None if chosen is None else selectors.revisions_by_id(request.project, chosen)
    version = services.policy_version_create_candidate(
        project=request.project,
        revisions=revisions,
        adapter_ref=payload.adapter_ref,
        base_model=payload.base_model,
        changelog=payload.changelog,
        actor=None,
        actor_label=api_key_label(request.api_key),
    )
    return Status(201, _version_detail(request, version.number))


@router.get("/versions/{number}", response=VersionDetailOut)
def get_version(request: ApiRequest, number: int) -> PolicyVersion:
    return _version_detail(request, number)


@router.get("/versions/{from_number}/diff/{to_number}")
def diff_versions(request: ApiRequest, from_number: int, to_number: int) -> dict:
    """Skills added, removed and changed (with a word-level diff), adapter and base model."""
    return selectors.versions_diff(request.project, from_number, to_number).as_dict()


def _version_decided(
    request: ApiRequest,
    number: int,
    decide: Callable[..., PolicyVersion],
    reason: str,
    **extra: Any,
) -> PolicyVersion:
    """Decide on version ``number`` with ``decide`` (a ``policy_version_*`` service, called
    with ``version=``) as the request's key; answer the version as it is afterwards, with the
    version it replaced when it became active."""
    decide(
        version=_version(request, number),
        actor=None,
        actor_label=api_key_label(request.api_key),
        reason=reason,
        **extra,
    )
    version = _version_detail(request, number)
    if version.status == VersionStatus.ACTIVE:
        version.replaced = selectors.version_replaced(version)  # type: ignore[attr-defined]
    return version


@router.post("/versions/{number}/promote", response=VersionDecidedOut)
def promote_version(
    request: ApiRequest, number: int, payload: PromoteIn | None = None
) -> PolicyVersion:
    """Make the candidate ``number`` active; the answer names the version it replaced. 409
    when the active version is not the one the candidate was built on (or ``replaces``)."""
    reason = payload.reason if payload else ""
    replaces = payload.replaces if payload else None
    return _version_decided(
        request, number, services.policy_version_promote, reason, replaces=replaces
    )


@router.post("/versions/{number}/reject", response=VersionDetailOut)
def reject_version(request: ApiRequest, number: int, payload: ReasonIn) -> PolicyVersion:
    return _version_decided(request, number, services.policy_version_reject, payload.reason)


@router.post("/versions/{number}/rollback", response=VersionDecidedOut)
def rollback_to_version(request: ApiRequest, number: int, payload: ReasonIn) -> PolicyVersion:
    """Make the retired version ``number`` active again."""

    def rollback(*, version: PolicyVersion, **decision: Any) -> PolicyVersion:
        return services.policy_version_rollback(to_version=version, **decision)

    return _version_decided(request, number, rollback, payload.reason)
