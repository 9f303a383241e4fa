"""Traffic counts in the API: an agent that neither uses the proxy nor reports its turns says
how many turns it served (``ingest`` keys), so that effectiveness has a denominator; reports are
listed with ``ingest`` or ``admin`` keys. The schemas are this router's only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ninja import Query, Router, Schema, Status
from pydantic import ConfigDict, Field, field_validator

from base.api_shapes import PRINTABLE_ID, ApiDateTime, JsonInt, matches
from base.auth import ingest_auth, read_auth
from base.errors import DomainError
from base.pagination import paginate
from base.requests import ApiRequest
from incidents import traffic
from incidents.traffic_models import TrafficReport

router = Router(tags=["traffic"])

_AGENT_MESSAGE = "The agent's name must be printable text, not only white space."


class TrafficIn(Schema):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=PRINTABLE_ID,
        description="Client id: the idempotency key (a retry with it counts once).",
    )
    agent: str = Field(
        min_length=1,
        max_length=200,
        pattern=PRINTABLE_ID,
        description="The agent's name (or an object with `name`, as incidents name it).",
    )
    turns: JsonInt = Field(ge=0, le=100_000_000, description="Turns served in the window.")
    window_start: ApiDateTime
    window_end: ApiDateTime = Field(description="After window_start, at most 24 hours later.")
    policy_version: JsonInt | None = Field(default=None, ge=1, le=2_147_483_647)

    @field_validator("agent", mode="before")
    @classmethod
    def agent_name(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" in value:
            value = value["name"]
        if isinstance(value, str):
            return matches(PRINTABLE_ID, value.strip(), _AGENT_MESSAGE)
        return value


class TrafficOut(Schema):
    id: int
    client_id: str | None
    agent: str
    turns: int
    window_start: datetime
    window_end: datetime
    policy_version: int | None
    received_at: datetime


class TrafficAccepted(TrafficOut):
    duplicate: bool


class TrafficPage(Schema):
    items: list[TrafficOut]
    next_cursor: str | None


class TrafficFilter(Schema):
    agent: str | None = None
    since: ApiDateTime | None = Field(None, description="Reports whose window ends after this.")
    until: ApiDateTime | None = Field(None, description="Reports whose window starts before.")
    cursor: str | None = None
    limit: int = 50


def _out(report: TrafficReport) -> dict[str, Any]:
    return {
        "id": report.pk,
        "client_id": report.client_id,
        "agent": report.agent_name,
        "turns": report.turns,
        "window_start": report.window_start,
        "window_end": report.window_end,
        "policy_version": report.policy_version,
        "received_at": report.received_at,
    }


@router.post(
    "/traffic",
    auth=ingest_auth,
    response={200: TrafficAccepted, 201: TrafficAccepted},
    summary="Report how many turns an agent served in a window",
)
def post_traffic(request: ApiRequest, payload: TrafficIn) -> Status:
    """For agents that do not use the proxy and do not report each turn: effectiveness counts
    these turns with the recorded ones (spread evenly over the window). 201 when stored; 200
    with the stored report when this `id` was seen before (counted once); 409 when that `id`
    was stored with other figures."""
    recorded = traffic.traffic_report_record(
        project=request.project,
        agent=payload.agent,
        turns=payload.turns,
        window_start=payload.window_start,
        window_end=payload.window_end,
        client_id=payload.id,
        policy_version=payload.policy_version,
        api_key_id=request.api_key.pk,
    )
    return Status(
        200 if recorded.duplicate else 201,
        {**_out(recorded.report), "duplicate": recorded.duplicate},
    )


@router.get("/traffic", auth=read_auth, response=TrafficPage, summary="List traffic reports")
def list_traffic(request: ApiRequest, filters: Query[TrafficFilter]) -> dict[str, Any]:
    """Newest window first; `since` and `until` keep the reports whose window overlaps them."""
    if not 1 <= filters.limit <= 200:
        raise DomainError("limit must be between 1 and 200.", field="limit")
    qs = traffic.traffic_reports_for_project(
        request.project, agent=filters.agent, since=filters.since, until=filters.until
    )
    items, next_cursor = paginate(
        qs, time_field="window_start", cursor=filters.cursor, limit=filters.limit
    )
    return {"items": [_out(r) for r in items], "next_cursor": next_cursor}
