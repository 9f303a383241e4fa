"""Runtime API for agents (runtime-scoped keys): the policy, skill retrieval, session feedback.

The schemas live here rather than in ``skills/schemas.py``: they are the runtime's alone."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from django.http import HttpRequest, HttpResponse
from ninja import Query, Router, Schema
from ninja.security import HttpBearer
from pydantic import ConfigDict, Field, model_validator

from incidents.schemas import ErrorIn, KindLiteral, SeverityLiteral

from . import runtime


class RuntimeAuth(HttpBearer):
    """``Authorization: Bearer <key>`` with the runtime scope; cached per process for a few
    seconds so polling agents do not cost a database query each."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        api_key = runtime.runtime_authenticate(token)
        if api_key is not None:
            request.api_key = api_key  # type: ignore[attr-defined]
            request.project = api_key.project  # type: ignore[attr-defined]
        return api_key


router = Router(tags=["runtime"], auth=RuntimeAuth())


class PolicyQuery(Schema):
    version: int | None = Field(default=None, ge=1, le=2_147_483_647)


class RetrieveIn(Schema):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    query: str | None = Field(default=None, max_length=50_000)
    messages: list[dict[str, Any]] | None = Field(default=None, max_length=500)
    k: int = Field(default=runtime.DEFAULT_TOP_K, ge=1, le=50)
    min_score: float = Field(default=runtime.DEFAULT_MIN_SCORE, ge=-1.0, le=1.0)
    token_budget: int = Field(default=runtime.DEFAULT_TOKEN_BUDGET, ge=1, le=200_000)
    version: int | None = Field(default=None, ge=1, le=2_147_483_647)

    @model_validator(mode="after")
    def needs_a_task(self) -> RetrieveIn:
        if not (self.query or "").strip() and not self.messages:
            raise ValueError("Give the task as 'query' (text) or 'messages' (OpenAI chat format).")
        return self


class RetrievedSkill(Schema):
    slug: str
    name: str
    description: str
    instructions: str
    category: str
    revision: int
    revision_id: int
    tokens: int
    score: float


class RetrieveOut(Schema):
    policy_version: int
    query: str
    tokens: int
    skills: list[RetrievedSkill]


class FailureIn(Schema):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    id: str | None = Field(default=None, min_length=1, max_length=200)
    kind: KindLiteral = "wrong_answer"
    severity: SeverityLiteral = "medium"
    error: ErrorIn = Field(default_factory=ErrorIn)
    feedback: str = Field(default="", max_length=20_000)
    agent: str | None = Field(default=None, min_length=1, max_length=200)


class FeedbackIn(Schema):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    session_id: str = Field(min_length=1, max_length=200)
    outcome: Literal["success", "failure", "unknown"] | None = None
    reward: float | None = Field(default=None, ge=-1e6, le=1e6)
    failure: FailureIn | None = None


class FeedbackOut(Schema):
    session_id: str
    trajectories_updated: int
    incident_id: UUID | None
    group_id: int | None
    duplicate: bool


def _with_version(response: HttpResponse, snapshot: runtime.PolicySnapshot) -> HttpResponse:
    response["ETag"] = snapshot.etag
    response["X-MetaClaw-Policy-Version"] = snapshot.header_value
    response["Cache-Control"] = "no-cache"
    return response


def _etag_matches(header: str, etag: str) -> bool:
    candidates = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in candidates or etag in candidates


@router.get("/runtime/policy", summary="The active policy version (or ?version=N)")
def runtime_policy(request: HttpRequest, filters: Query[PolicyQuery]) -> HttpResponse:
    """The policy the key's project runs with: version number, skills with their text, adapter
    reference and base model. ``If-None-Match`` with the last ``ETag`` answers 304."""
    snapshot = runtime.policy_snapshot(project_id=request.project.pk, version=filters.version)
    if _etag_matches(request.headers.get("If-None-Match", ""), snapshot.etag):
        return _with_version(HttpResponse(status=304), snapshot)
    return _with_version(HttpResponse(snapshot.body, content_type="application/json"), snapshot)


@router.post("/runtime/skills/retrieve", response=RetrieveOut, summary="Skills relevant to a task")
def runtime_skills_retrieve(request: HttpRequest, payload: RetrieveIn) -> HttpResponse:
    """The top-k approved skills of the active (or given) version for the task, best first,
    each with its score, above ``min_score`` and within ``token_budget`` together. With
    ``messages``, the query is the user's latest request, without framework boilerplate."""
    snapshot = runtime.policy_snapshot(project_id=request.project.pk, version=payload.version)
    query = (payload.query or "").strip() or runtime.query_from_messages(payload.messages or [])
    found = runtime.skills_retrieve(
        snapshot=snapshot,
        query=query,
        k=payload.k,
        min_score=payload.min_score,
        token_budget=payload.token_budget,
    )
    skills = [{**r.skill.as_dict(), "score": r.score} for r in found]
    body = {
        "policy_version": snapshot.number,
        "query": query,
        "tokens": sum(s["tokens"] for s in skills),
        "skills": skills,
    }
    response = HttpResponse(
        RetrieveOut(**body).model_dump_json().encode(), content_type="application/json"
    )
    response["X-MetaClaw-Policy-Version"] = snapshot.header_value
    return response


@router.post("/runtime/feedback", response=FeedbackOut, summary="How a session ended")
def runtime_feedback(request: HttpRequest, payload: FeedbackIn) -> runtime.FeedbackResult:
    """Set the outcome and reward of a session's recorded turns; a failure also becomes an
    incident of the fast loop (idempotent per session unless ``failure.id`` is given)."""
    return runtime.session_feedback_record(
        project=request.project,
        session_id=payload.session_id,
        outcome=payload.outcome,
        reward=payload.reward,
        failure=payload.failure.model_dump() if payload.failure else None,
        actor_label=f"api-key:{request.api_key.prefix}",
    )
