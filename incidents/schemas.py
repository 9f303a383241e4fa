"""API schemas of the incidents app (django-ninja / pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from ninja import Schema
from pydantic import BaseModel, ConfigDict, Field, field_validator

KindLiteral = Literal[
    "tool_error", "wrong_answer", "user_complaint", "timeout", "guardrail", "other"
]
SeverityLiteral = Literal["low", "medium", "high", "critical"]
RoleLiteral = Literal["system", "developer", "user", "assistant", "tool", "function"]


class StrictIn(BaseModel):
    """Ingestion input: plain pydantic models, not ninja ``Schema``s. A ``Schema`` runs a Python
    root validator (to read ORM objects) for every nested model, which cost a quarter of a
    batch's CPU; request bodies are dicts and need none of it."""

    # NaN and infinities are not JSON and PostgreSQL refuses them: reject at the door.
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")


class ToolCallFunction(StrictIn):
    name: str = Field(max_length=200)
    arguments: str | dict[str, Any] = ""


class ToolCall(StrictIn):
    id: str = Field(default="", max_length=200)
    type: str = Field(default="function", max_length=32)
    function: ToolCallFunction


class ChatMessage(StrictIn):
    """One message in OpenAI chat format. Other keys are kept as sent (``refusal``,
    ``reasoning_content``, provider extras): the stored turn is what the agent saw, and what the
    slow loop trains on."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    role: RoleLiteral
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=200)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, max_length=200)


class AgentIn(StrictIn):
    name: str = Field(min_length=1, max_length=200)
    version: str = Field(default="", max_length=100)


class ErrorIn(StrictIn):
    type: str = Field(default="", max_length=200)
    message: str = Field(default="", max_length=20_000)
    tool: str | None = Field(default=None, max_length=200)


class FeedbackIn(StrictIn):
    text: str = Field(default="", max_length=20_000)
    score: float | None = None
    reward: float | None = Field(default=None, ge=-1e6, le=1e6)


class IncidentIn(StrictIn):
    id: str = Field(min_length=1, max_length=200, description="Client id: the idempotency key.")
    agent: AgentIn
    policy_version: int | None = Field(default=None, ge=1, le=2_147_483_647)
    kind: KindLiteral
    severity: SeverityLiteral = "medium"
    error: ErrorIn = Field(default_factory=ErrorIn)
    messages: list[ChatMessage] = Field(default_factory=list, max_length=500)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=200)
    feedback: FeedbackIn | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    session_id: str = Field(default="", max_length=200)
    occurred_at: datetime | None = None

    @field_validator("id")
    @classmethod
    def id_is_printable(cls, value: str) -> str:
        if not value.strip() or not value.isprintable():
            raise ValueError("must be printable text")
        return value


class IncidentAccepted(Schema):
    id: UUID
    client_id: str
    group_id: int
    status: str
    duplicate: bool


class BatchIn(BaseModel):
    # Items are validated one by one so that a bad item fails alone (per-item results).
    items: list[Any] = Field(min_length=1)


class BatchItemResult(BaseModel):
    index: int
    status: int
    id: UUID | None = None
    client_id: str | None = None
    group_id: int | None = None
    duplicate: bool = False
    errors: list[dict[str, Any]] | None = None


class BatchOut(BaseModel):
    # Built from dicts, never from ORM objects: a plain model spares ninja's per-item getter.
    accepted: int
    duplicates: int
    rejected: int
    results: list[BatchItemResult]


OutcomeLiteral = Literal["success", "failure", "unknown"]


class TrajectoryIn(StrictIn):
    id: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("id")
    @classmethod
    def id_is_printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be printable text")
        return value

    session_id: str = Field(default="", max_length=200)
    turn_type: Literal["main", "side"] = "main"
    agent: AgentIn | None = None
    policy_version: int | None = Field(default=None, ge=1, le=2_147_483_647)
    model: str = Field(default="", max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=200)
    reward: float | None = Field(default=None, ge=-1e6, le=1e6)
    outcome: OutcomeLiteral = "unknown"
    corrected_answer: str = Field(default="", max_length=50_000)
    metadata: dict[str, Any] = Field(default_factory=dict)
    occurred_at: datetime | None = None


class GroupOut(Schema):
    id: int
    title: str
    fingerprint: str
    fingerprint_version: int
    agent_name: str
    kind: str
    error_type: str
    tool_name: str
    severity: str
    status: str
    synthesis_status: str
    event_count: int
    first_seen: datetime
    last_seen: datetime


class IncidentOut(Schema):
    id: UUID
    client_id: str
    group_id: int
    agent_name: str
    agent_version: str
    policy_version: int | None
    kind: str
    severity: str
    status: str
    error_type: str
    error_message: str
    tool_name: str
    messages: list[Any]
    tools: list[Any]
    feedback_text: str
    feedback_score: float | None
    reward: float | None
    metadata: dict[str, Any]
    session_id: str
    occurred_at: datetime
    received_at: datetime


class Page(Schema):
    next_cursor: str | None


class IncidentPage(Page):
    items: list[IncidentOut]


class GroupPage(Page):
    items: list[GroupOut]


class GroupStatusIn(Schema):
    status: Literal["unresolved", "resolved", "ignored"]
