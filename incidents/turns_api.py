"""Recorded turns: what each turn ran with (policy version, the skills injected with their
retrieval scores and ranks, the model it was sent to), listed with filters. Read scope.

The schemas live here rather than in ``incidents/schemas.py``: they are this router's only,
and that module is past its size."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from ninja import Field, Query, Router, Schema

from base.api_shapes import PagedFilter
from base.auth import read_auth
from base.requests import ApiRequest
from incidents import selectors
from incidents.models import Trajectory

router = Router(tags=["turns"])


class InjectedSkillOut(Schema):
    slug: str
    revision: int | None = None
    revision_id: int | None = None
    score: float | None = None
    rank: int | None = None


class TurnOut(Schema):
    id: UUID
    source: str
    session_id: str
    turn_type: str
    agent_name: str
    policy_version: int | None
    model: str = Field(description="The model the turn was sent to (after the model map).")
    requested_model: str = Field(description="The model the agent asked for (proxied turns).")
    skills_injected: list[InjectedSkillOut]
    min_score: float | None = Field(
        description="The retrieval threshold the proxy applied (None when not recorded)."
    )
    retrieval_query: str = Field(description="The text retrieval looked at (proxied turns).")
    status_code: int | None
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    outcome: str
    reward: float | None
    occurred_at: datetime
    received_at: datetime


class TurnPage(Schema):
    items: list[TurnOut]
    next_cursor: str | None


class TurnFilter(PagedFilter):
    source: str | None = None
    policy_version: int | None = None
    skill: str | None = Field(None, description="The slug of a skill injected into the turn.")
    model: str | None = None
    status: int | None = Field(None, description="The upstream's HTTP status code.")
    session_id: str | None = None


def _turn(turn: Trajectory) -> dict[str, Any]:
    retrieval = selectors.turn_retrieval(turn)
    metadata = turn.metadata if isinstance(turn.metadata, dict) else {}
    return {
        "id": turn.id,
        "source": turn.source,
        "session_id": turn.session_id,
        "turn_type": turn.turn_type,
        "agent_name": turn.agent_name,
        "policy_version": turn.policy_version,
        "model": turn.model,
        "requested_model": str(metadata.get("requested_model", ""))
        if turn.source == "proxy"
        else "",
        "skills_injected": [s for s in retrieval["skills"] if isinstance(s.get("slug"), str)],
        "min_score": retrieval["min_score"],
        "retrieval_query": retrieval["query"],
        "status_code": turn.status_code,
        "latency_ms": turn.latency_ms,
        "prompt_tokens": turn.prompt_tokens,
        "completion_tokens": turn.completion_tokens,
        "outcome": turn.outcome,
        "reward": turn.reward,
        "occurred_at": turn.occurred_at,
        "received_at": turn.received_at,
    }


@router.get("/turns", auth=read_auth, response=TurnPage, summary="List recorded turns")
def list_turns(request: ApiRequest, filters: Query[TurnFilter]):
    """Newest first, with what each turn ran with. `skill` keeps the turns a skill was injected
    into; `next_cursor` pages on (as for incidents)."""
    qs = selectors.turns_for_project(request.project, **filters.narrowing())
    page = filters.page(qs.defer("messages", "response", "tools"), time_field="occurred_at")
    return {**page, "items": [_turn(t) for t in page["items"]]}


@router.get("/turns/{turn_id}", auth=read_auth, response=TurnOut, summary="Get a recorded turn")
def get_turn(request: ApiRequest, turn_id: UUID):
    return _turn(selectors.turn_for_project(request.project, turn_id))
