"""API schemas of the incidents app (django-ninja / pydantic v2). Past 500 lines on purpose:
the shapes agents send, their readers and their OpenAPI descriptions read best together."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args
from uuid import UUID

from django.utils import timezone
from ninja import Schema
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from base.api_shapes import PRINTABLE_ID, ApiDateTime, JsonFloat, JsonInt, matches
from base.sanitize import clean_json_text

ID_MESSAGE = "must be text without control characters, not only white space"

# IncidentKind's values (tests/incidents/test_intake_shapes.py checks that they agree).
KindLiteral = Literal[
    "tool_error",
    "wrong_answer",
    "user_complaint",
    "timeout",
    "guardrail",
    "wrong_state",
    "policy_violation",
    "gave_up",
    "other",
]
SeverityLiteral = Literal["low", "medium", "high", "critical"]
RoleLiteral = Literal["system", "developer", "user", "assistant", "tool", "function"]

# What agents, evaluators and benchmarks call the kinds (compared lower-cased, with "-" and
# spaces read as "_").
KIND_ALIASES: dict[str, str] = {
    "exception": "tool_error",
    "tool_failure": "tool_error",
    "tool_exception": "tool_error",
    "incorrect": "wrong_answer",
    "incorrect_answer": "wrong_answer",
    "wrong_output": "wrong_answer",
    "wrong_final_state": "wrong_state",
    "final_state": "wrong_state",
    "final_state_mismatch": "wrong_state",
    "state_mismatch": "wrong_state",
    "incorrect_state": "wrong_state",
    "policy": "policy_violation",
    "rule_violation": "policy_violation",
    "policy_breach": "policy_violation",
    "giving_up": "gave_up",
    "give_up": "gave_up",
    "abandoned": "gave_up",
    "incomplete": "gave_up",
    "unfinished": "gave_up",
    "complaint": "user_complaint",
    "timed_out": "timeout",
    "deadline_exceeded": "timeout",
    "content_filter": "guardrail",
}

# The levels of Python logging, syslog, Sentry and OpenTelemetry (whose numbered variants,
# ERROR2 and the like, read as their level) on our four-step scale.
SEVERITY_ALIASES: dict[str, str] = {
    "trace": "low",
    "debug": "low",
    "info": "low",
    "information": "low",
    "informational": "low",
    "notice": "low",
    "log": "low",
    "warn": "medium",
    "warning": "medium",
    "error": "high",
    "err": "high",
    "crit": "critical",
    "fatal": "critical",
    "alert": "critical",
    "emerg": "critical",
    "emergency": "critical",
    "panic": "critical",
}
_OTEL_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal")


_KINDS = frozenset(get_args(KindLiteral))
_SEVERITIES = frozenset(get_args(SeverityLiteral))


def _kind(value: str) -> str:
    key = value.strip().lower().replace("-", "_").replace(" ", "_")
    return KIND_ALIASES.get(key, key)


def _severity(value: str) -> str:
    key = value.strip().lower()
    if key[-1:] in ("2", "3", "4") and key[:-1] in _OTEL_LEVELS:
        key = key[:-1]
    return SEVERITY_ALIASES.get(key, key)


def _aliases_text(aliases: dict[str, str]) -> str:
    by_target: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        by_target.setdefault(target, []).append(alias)
    return "; ".join(f"{', '.join(names)} → {target}" for target, names in by_target.items())


_KIND_DESCRIPTION = (
    "What went wrong. Case-insensitive; '-' and spaces read as '_'. Also accepted: "
    + _aliases_text(KIND_ALIASES)
    + "."
)
_SEVERITY_DESCRIPTION = (
    "low, medium, high or critical; the levels of Python logging, syslog, Sentry and "
    "OpenTelemetry are accepted too (case-insensitive; OTel's numbered variants such as ERROR2 "
    "read as their level): " + _aliases_text(SEVERITY_ALIASES) + "."
)


def _as_text(value: Any) -> Any:
    """Text as sent; any other JSON value as its compact JSON text (keys in the order sent)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return clean_json_text(value)[0]


_AS_TEXT = (
    " Text is stored as sent; any other JSON value (an object, a list) as its compact JSON "
    "text, keys in the order sent."
)
TextOrJson = Annotated[
    str,
    BeforeValidator(_as_text),
    # Any JSON value: null reads as "", a number or a boolean as its JSON text.
    WithJsonSchema({"type": ["string", "object", "array", "number", "boolean", "null"]}),
]


def _unknown_fields_to_metadata(
    model: type[BaseModel], data: dict[str, Any], changes: dict[str, Any]
) -> None:
    """Add to ``changes`` the ``metadata`` of raw input ``data`` with the fields ``model``
    does not name added under their own names, or raise a validation error naming each such
    field that ``metadata`` already holds with another value. The fields stay in the input
    too, where pydantic keeps them as the model's extras (``moved_to_metadata``)."""
    known = model.__pydantic_fields__.keys()
    if data.keys() <= known:  # the usual case, and the cheapest test of it
        return
    unknown = data.keys() - known
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        return  # validation names metadata
    extra = {name: value for name, value in data.items() if name in unknown}  # as sent
    conflicts = [
        InitErrorDetails(
            type=PydanticCustomError(
                "metadata_conflict",
                "Not a known field, and metadata already holds a different '{name}'.",
                {"name": name},
            ),
            loc=(name,),
            input=value,
        )
        for name, value in extra.items()
        if name in metadata and metadata[name] != value
    ]
    if conflicts:
        raise ValidationError.from_exception_data(model.__name__, conflicts)
    changes["metadata"] = {**metadata, **extra}


class StrictIn(BaseModel):
    """Ingestion input: plain pydantic models, not ninja ``Schema``s. A ``Schema`` runs a Python
    root validator (to read ORM objects) for every nested model, which cost a quarter of a
    batch's CPU; request bodies are dicts and need none of it."""

    # NaN and infinities are not JSON and PostgreSQL refuses them: reject at the door.
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")


# A tool call's keys are kept as sent, as its message's are.
class ToolCallFunction(StrictIn):
    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    name: str = Field(max_length=200)
    arguments: str | dict[str, Any] = ""


class ToolCall(StrictIn):
    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    id: str = Field(default="", max_length=200)
    type: str = Field(default="function", max_length=32)
    function: ToolCallFunction


class ChatMessage(StrictIn):
    """One message in OpenAI chat format. Other keys are kept as sent (``refusal``,
    ``reasoning_content``, provider extras): the stored turn is what the agent saw, and what the
    slow loop trains on.

    Stored with ``exclude_unset``: a key left out stays out, an explicit null stays null
    (``"content": null`` beside tool calls), and so it is for tool calls and their keys."""

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
    score: JsonFloat | None = None
    reward: JsonFloat | None = Field(default=None, ge=-1e6, le=1e6)


def _error_schema(schema: dict[str, Any]) -> None:
    # OpenAPI shows what IncidentIn reads as an error besides the object.
    ref = schema.pop("allOf", [{}])[0].get("$ref") or schema.pop("$ref", None)
    if ref is not None:
        schema["anyOf"] = [{"$ref": ref}, {"type": "string"}, {"type": "null"}]


_END_USER_DESCRIPTION = "The end user served (an opaque id); else `user` or `end_user` in metadata."


class IncidentIn(StrictIn):
    """One failure. Fields not named here are kept in `metadata` under their own names (the
    answer's `warnings` lists them), unless `metadata` already holds that name with another
    value: the incident is then refused with the field named."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    id: str = Field(
        min_length=1,
        max_length=200,
        pattern=PRINTABLE_ID,
        description="Client id: the idempotency key.",
    )
    agent: AgentIn
    policy_version: JsonInt | None = Field(default=None, ge=1, le=2_147_483_647)
    kind: KindLiteral = Field(description=_KIND_DESCRIPTION)
    severity: SeverityLiteral = Field(default="medium", description=_SEVERITY_DESCRIPTION)
    error: ErrorIn = Field(
        default_factory=ErrorIn,
        description="An object, or a string: the error's message; null is no error.",
        json_schema_extra=_error_schema,
    )
    messages: list[ChatMessage] = Field(default_factory=list, max_length=500)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=200)
    feedback: FeedbackIn | None = None
    reward: JsonFloat | None = Field(
        default=None,
        ge=-1e6,
        le=1e6,
        description="The run's reward; the same as feedback.reward (both given: they must agree).",
    )
    task: TextOrJson = Field(
        default="", max_length=50_000, description="What the agent was asked to do." + _AS_TEXT
    )
    outcome: TextOrJson = Field(
        default="",
        max_length=100_000,
        description="How the run ended: its final answer or state." + _AS_TEXT,
    )
    expected_outcome: TextOrJson = Field(
        default="",
        max_length=100_000,
        description="What should have happened, when the reporter knows it." + _AS_TEXT,
    )
    metadata: dict[str, Any] = Field(default_factory=dict)
    session_id: str = Field(default="", max_length=200)
    end_user: str = Field(default="", max_length=200, description=_END_USER_DESCRIPTION)
    occurred_at: ApiDateTime | None = None

    @model_validator(mode="before")
    @classmethod
    def read_agents_shapes(cls, data: Any) -> Any:
        """The shapes agents emit, read before validation: kind and severity by their other
        names, an error as a string or null, unknown fields copied into metadata. One Python
        call an item, the same work as validators per field would do in three or four."""
        if not isinstance(data, dict):
            return data
        changes: dict[str, Any] = {}
        # A name we do not know is left as sent, for the error to quote.
        kind = data.get("kind")
        if isinstance(kind, str) and kind not in _KINDS and _kind(kind) in _KINDS:
            changes["kind"] = _kind(kind)
        severity = data.get("severity")
        if isinstance(severity, str) and severity not in _SEVERITIES:
            if _severity(severity) in _SEVERITIES:
                changes["severity"] = _severity(severity)
        error = data.get("error")
        if isinstance(error, str):
            changes["error"] = {"message": error}
        elif error is None and "error" in data:
            changes["error"] = {}
        _unknown_fields_to_metadata(cls, data, changes)
        return {**data, **changes} if changes else data

    @field_validator("id", mode="before")
    @classmethod
    def id_is_printable(cls, value: Any) -> Any:
        # Before the pattern, to say it in words; the pattern is the schema's.
        return matches(PRINTABLE_ID, value, ID_MESSAGE) if isinstance(value, str) else value

    @field_validator("reward")
    @classmethod
    def reward_agrees_with_feedback(cls, value: float | None, info: ValidationInfo) -> Any:
        feedback = info.data.get("feedback")
        if value is not None and feedback is not None and feedback.reward not in (None, value):
            raise ValueError(f"differs from feedback.reward ({feedback.reward})")
        return value

    @property
    def moved_to_metadata(self) -> tuple[str, ...]:
        """The unknown top-level fields kept in ``metadata``, in the order sent."""
        return tuple(self.__pydantic_extra__ or ())


class IngestWarning(BaseModel):
    """Something the input said that was stored elsewhere than the client may expect."""

    field: str
    message: str
    type: str


class IncidentAccepted(Schema):
    id: UUID
    client_id: str
    group_id: int
    status: str
    duplicate: bool
    warnings: list[IngestWarning] = Field(default_factory=list)


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
    warnings: list[IngestWarning] | None = None


class BatchOut(BaseModel):
    # Built from dicts, never from ORM objects: a plain model spares ninja's per-item getter.
    accepted: int
    duplicates: int
    rejected: int
    results: list[BatchItemResult]


OutcomeLiteral = Literal["success", "failure", "unknown"]


class TrajectoryIn(StrictIn):
    """One turn. Fields not named here are kept in `metadata` as an incident's are."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow")

    id: str | None = Field(default=None, min_length=1, max_length=200, pattern=PRINTABLE_ID)

    @field_validator("id", mode="before")
    @classmethod
    def id_is_printable(cls, value: Any) -> Any:
        return matches(PRINTABLE_ID, value, ID_MESSAGE) if isinstance(value, str) else value

    session_id: str = Field(default="", max_length=200)
    end_user: str = Field(default="", max_length=200, description=_END_USER_DESCRIPTION)
    turn_type: Literal["main", "side"] = "main"
    agent: AgentIn | None = None
    policy_version: JsonInt | None = Field(default=None, ge=1, le=2_147_483_647)
    model: str = Field(default="", max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
    tools: list[dict[str, Any]] = Field(default_factory=list, max_length=200)
    reward: JsonFloat | None = Field(default=None, ge=-1e6, le=1e6)
    outcome: OutcomeLiteral = "unknown"
    corrected_answer: str = Field(default="", max_length=50_000)
    metadata: dict[str, Any] = Field(default_factory=dict)
    occurred_at: ApiDateTime | None = None

    @model_validator(mode="before")
    @classmethod
    def unknown_fields_to_metadata(cls, data: Any) -> Any:
        changes: dict[str, Any] = {}
        if isinstance(data, dict):
            _unknown_fields_to_metadata(cls, data, changes)
        return {**data, **changes} if changes else data

    @property
    def moved_to_metadata(self) -> tuple[str, ...]:
        return tuple(self.__pydantic_extra__ or ())


class GroupOut(Schema):
    @staticmethod
    def resolve_synthesis_next_attempt_at(obj: Any) -> datetime | None:
        due = (
            getattr(obj, "synthesis_requested_at", None)
            if obj.synthesis_status == "waiting"
            else None
        )
        return due if due is not None and due > timezone.now() else None

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
    synthesis_error: str = Field(default="", description="Why it failed, or why it is retried.")
    synthesis_attempts: int = Field(default=0, description="Tries since a person last asked.")
    synthesis_next_attempt_at: datetime | None = Field(default=None, description="Backoff's end.")
    event_count: int
    first_seen: datetime
    last_seen: datetime
    merged_into_id: int | None = Field(
        default=None, description="Set when this group was merged into another: an alias."
    )


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
    task: str
    outcome: str
    expected_outcome: str
    metadata: dict[str, Any]
    session_id: str
    end_user: str
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


class GroupMergeIn(Schema):
    group_ids: list[int] = Field(
        min_length=1, max_length=100, description="Groups to merge into this one."
    )


class GroupSplitIn(Schema):
    fingerprints: list[str] = Field(
        min_length=1,
        max_length=100,
        description="Fingerprints (of this group's incidents) to split off, each to a group "
        "of its own; see GET /groups/{id}/fingerprints.",
    )


class GroupFingerprintOut(Schema):
    fingerprint: str
    normalized_message: str
    incidents: int
    own: bool
    merged_group_id: int | None


class RelatedGroupOut(Schema):
    id: int
    title: str
    kind: str
    tool_name: str
    event_count: int
    reason: str


class ProvenanceOut(Schema):
    """How many distinct sources stand behind a group's incidents."""

    incidents: int
    sessions: int
    end_users: int
    agents: int
    api_keys: int
    sources: int
    single_source: bool


class AbusiveSourceIn(Schema):
    kind: Literal["session", "end_user"]
    value: str = Field(min_length=1, max_length=200, description="The session id or end user.")
    reason: str = Field(default="", max_length=2000)


class AbusiveSourceOut(Schema):
    id: int
    kind: str
    value: str
    reason: str
    marked_by: str
    created_at: datetime

    @staticmethod
    def resolve_marked_by(obj: Any) -> str:
        return obj.marked_by.get_username() if obj.marked_by else obj.marked_by_label
