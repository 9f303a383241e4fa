"""Runtime API for agents (runtime-scoped keys): the policy, skill retrieval, session feedback.

The schemas live here rather than in ``skills/schemas.py``: they are the runtime's alone."""

from __future__ import annotations

import json
from typing import Any, Literal
from urllib.parse import parse_qs
from uuid import UUID

from django.http import HttpRequest, HttpResponse
from ninja import Query, Router, Schema
from ninja.security import HttpBearer
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from base.api_shapes import (
    PRINTABLE_ID,
    PRINTABLE_TEXT,
    JsonFloat,
    JsonInt,
    matches,
    objects_only,
)
from base.errors import NotFound
from base.fast_lane import (
    FastResponse,
    api_admit,
    api_error,
    api_invalid,
    in_worker_thread,
)
from base.requests import ApiRequest, attach_api_key
from incidents.schemas import ErrorIn, KindLiteral, SeverityLiteral
from skills.runtime import admission, feedback, policy, retrieval


class RuntimeAuth(HttpBearer):
    """``Authorization: Bearer <key>`` with the runtime scope; cached per process for a few
    seconds so polling agents do not cost a database query each."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        api_key = admission.runtime_authenticate(token)
        if api_key is not None:
            attach_api_key(request, api_key)
        return api_key


# Operation ids as before this module moved into skills.runtime (see metaclaw_site.api).
OPENAPI_OPERATION_PREFIX = "skills_api_runtime"

router = Router(tags=["runtime"], auth=RuntimeAuth())


class PolicyQuery(Schema):
    version: int | None = Field(default=None, ge=1, le=2_147_483_647)
    session_id: str | None = Field(
        default=None,
        max_length=200,
        pattern=PRINTABLE_TEXT,
        description="The agent's session (or the X-Session-Id header, as the proxy reads it): "
        "while a canary runs, the session's arm decides the version served.",
    )

    @field_validator("session_id", mode="before")
    @classmethod
    def blank_is_no_session(cls, value: Any) -> Any:
        # ``?session_id=`` from an agent whose session variable is empty: no session, no arm.
        return None if isinstance(value, str) and not value.strip() else value


# "canary" or "control" while a canary runs and the request names its session (as the proxy).
CANARY_HEADER = "x-metaclaw-canary"
SESSION_HEADER = "x-session-id"


class RetrieveIn(Schema):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    query: str | None = Field(default=None, max_length=50_000)
    messages: list[dict[str, Any]] | None = Field(default=None, max_length=500)
    k: JsonInt = Field(default=retrieval.DEFAULT_TOP_K, ge=1, le=50)
    min_score: JsonFloat = Field(default=retrieval.DEFAULT_MIN_SCORE, ge=-1.0, le=1.0)
    token_budget: JsonInt = Field(default=retrieval.DEFAULT_TOKEN_BUDGET, ge=1, le=200_000)
    version: JsonInt | None = Field(default=None, ge=1, le=2_147_483_647)

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

    id: str | None = Field(default=None, min_length=1, max_length=200, pattern=PRINTABLE_ID)
    kind: KindLiteral = "wrong_answer"
    severity: SeverityLiteral = "medium"
    error: ErrorIn = Field(default_factory=ErrorIn)
    feedback: str = Field(default="", max_length=20_000)
    agent: str | None = Field(default=None, min_length=1, max_length=200)

    _objects_only = model_validator(mode="before")(objects_only)


class SessionFeedbackIn(Schema):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    session_id: str = Field(min_length=1, max_length=200, pattern=PRINTABLE_TEXT)
    outcome: Literal["success", "failure", "unknown"] | None = None
    reward: JsonFloat | None = Field(default=None, ge=-1e6, le=1e6)
    failure: FailureIn | None = None

    @field_validator("session_id", mode="before")
    @classmethod
    def printable_session_id(cls, value: Any) -> Any:
        # What the proxy records (X-Session-Id) is header text: printable, never NUL.
        if not isinstance(value, str):
            return value
        return matches(PRINTABLE_TEXT, value, "The session id must be printable text.")


class FeedbackOut(Schema):
    session_id: str
    trajectories_updated: int
    incident_id: UUID | None
    group_id: int | None
    duplicate: bool


def _etag_matches(header: str, etag: str) -> bool:
    candidates = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in candidates or etag in candidates


def policy_answer(
    snapshot: policy.PolicySnapshot, if_none_match: str, arm: str = ""
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of ``GET /runtime/policy`` (both doors). The ETag is the
    version's, so each arm of a canary has its own; ``Vary`` keeps shared caches from handing
    one session's arm to another."""
    headers = [
        ("etag", snapshot.etag),
        ("x-metaclaw-policy-version", snapshot.header_value),
        ("cache-control", "no-cache"),
        ("vary", "X-Session-Id"),
        *([(CANARY_HEADER, arm)] if arm else []),
        # Served from this process's copy while Redis is down: say so.
        *policy.policy_stale_headers(snapshot),
    ]
    if if_none_match and _etag_matches(if_none_match, snapshot.etag):
        return 304, headers, b""
    return 200, [("content-type", "application/json"), *headers], snapshot.body


def retrieve_answer(snapshot: policy.PolicySnapshot, payload: RetrieveIn) -> bytes:
    """The body of ``POST /runtime/skills/retrieve`` (both doors)."""
    query = (payload.query or "").strip() or retrieval.query_from_messages(payload.messages or [])
    found = retrieval.skills_retrieve(
        snapshot=snapshot,
        query=query,
        k=payload.k,
        min_score=payload.min_score,
        token_budget=payload.token_budget,
    )
    skills = [{**r.skill.as_dict(), "score": r.score} for r in found]
    return _dumps(
        {
            "policy_version": snapshot.number,
            "query": query,
            "tokens": sum(s["tokens"] for s in skills),
            "skills": skills,
        }
    )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _django(status: int, headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    return response


def _session_of(header: str, filters: PolicyQuery) -> str:
    return header.strip()[:200] or (filters.session_id or "")


@router.get("/runtime/policy", summary="The active policy version (or ?version=N)")
def runtime_policy(request: ApiRequest, filters: Query[PolicyQuery]) -> HttpResponse:
    """The policy the key's project runs with: version number, skills with their text, adapter
    reference and base model. ``If-None-Match`` with the last ``ETag`` answers 304. While a
    canary runs, a request that names its session (``X-Session-Id`` or ``?session_id=``) gets
    its arm's version, the same for the whole session, and ``X-MetaClaw-Canary`` says which
    arm; without a session, the active version."""
    project_id = request.project.pk
    version, arm = filters.version, ""
    session_id = _session_of(request.headers.get(SESSION_HEADER, ""), filters)
    if version is None and session_id:
        canary = policy.canary_cached(project_id=project_id)
        if canary is policy.CANARY_UNKNOWN:
            canary = policy.canary_load(project_id=project_id)
        version, arm = policy.session_arm(canary, session_id)
    snapshot = policy.policy_snapshot(project_id=project_id, version=version)
    return _django(*policy_answer(snapshot, request.headers.get("If-None-Match", ""), arm))


@router.post("/runtime/skills/retrieve", response=RetrieveOut, summary="Skills relevant to a task")
def runtime_skills_retrieve(request: ApiRequest, payload: RetrieveIn) -> HttpResponse:
    """The top-k approved skills of the active (or given) version for the task, best first,
    each with its score, above ``min_score`` and within ``token_budget`` together. With
    ``messages``, the query is the user's latest request, without framework boilerplate."""
    snapshot = policy.policy_snapshot(project_id=request.project.pk, version=payload.version)
    return _django(
        200,
        [("content-type", "application/json"), ("x-metaclaw-policy-version", str(snapshot.number))],
        retrieve_answer(snapshot, payload),
    )


# --- The same endpoints on the ASGI fast lane (base.fast_lane; skills.runtime.proxy.ROUTES) --
# Agents poll these; Django's middleware stack would cost more than the answer. Same handlers,
# same error shapes as the NinjaAPI's.


async def _fast_snapshot(project_id: int, version: int | None) -> Any:
    snapshot = policy.policy_snapshot_cached(project_id=project_id, version=version)
    if snapshot is not None:
        return snapshot
    try:
        return await in_worker_thread(policy.policy_snapshot)(
            project_id=project_id, version=version
        )
    except NotFound as exc:
        return api_error(404, str(exc), "not_found", field=exc.field)


async def fast_policy(*, headers: dict[str, str], query: str, body: bytes) -> Any:
    api_key = await api_admit(headers, ("runtime",))
    if isinstance(api_key, FastResponse):
        return api_key
    project = api_key.project
    try:
        filters = PolicyQuery.model_validate(
            {
                k: v[-1]
                for k, v in parse_qs(query, keep_blank_values=True).items()
                if k in ("version", "session_id")
            }
        )
    except PydanticValidationError as exc:
        return api_invalid(exc)
    version, arm = filters.version, ""
    session_id = _session_of(headers.get(SESSION_HEADER, ""), filters)
    if version is None and session_id:
        canary = policy.canary_cached(project_id=project.pk)
        if canary is policy.CANARY_UNKNOWN:
            canary = await in_worker_thread(policy.canary_load)(project_id=project.pk)
        version, arm = policy.session_arm(canary, session_id)
    snapshot = await _fast_snapshot(project.pk, version)
    if isinstance(snapshot, FastResponse):
        return snapshot
    return FastResponse(*policy_answer(snapshot, headers.get("if-none-match", ""), arm))


async def fast_retrieve(*, headers: dict[str, str], query: str, body: bytes) -> Any:
    api_key = await api_admit(headers, ("runtime",))
    if isinstance(api_key, FastResponse):
        return api_key
    project = api_key.project
    try:
        payload = RetrieveIn.model_validate_json(body or b"{}")
    except PydanticValidationError as exc:
        return api_invalid(exc)
    snapshot = await _fast_snapshot(project.pk, payload.version)
    if isinstance(snapshot, FastResponse):
        return snapshot
    return FastResponse(
        200,
        [("content-type", "application/json"), ("x-metaclaw-policy-version", str(snapshot.number))],
        retrieve_answer(snapshot, payload),
    )


@router.post("/runtime/feedback", response=FeedbackOut, summary="How a session ended")
def runtime_feedback(request: ApiRequest, payload: SessionFeedbackIn) -> feedback.FeedbackResult:
    """Set the outcome and reward of a session's recorded turns; a failure also becomes an
    incident of the fast loop (idempotent per session unless ``failure.id`` is given)."""
    return feedback.session_feedback_record(
        project=request.project,
        session_id=payload.session_id,
        outcome=payload.outcome,
        reward=payload.reward,
        failure=payload.failure.model_dump() if payload.failure else None,
        actor_label=f"api-key:{request.api_key.prefix}",
    )
