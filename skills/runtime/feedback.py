"""An agent's verdict on a session: its turns stamped with the outcome or reward, and a failure
reported as an incident, through incidents' services."""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from pydantic import ValidationError

from base.errors import DomainError
from base.models import Project
from skills.runtime.recording import recordings_wait

logger = logging.getLogger(__name__)

# --- Feedback -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackResult:
    session_id: str
    trajectories_updated: int
    incident_id: uuid.UUID | None
    group_id: int | None
    duplicate: bool


def session_feedback_record(
    *,
    project: Project,
    session_id: str,
    outcome: str | None = None,
    reward: float | None = None,
    failure: dict[str, Any] | None = None,
    actor_label: str = "",
) -> FeedbackResult:
    """Record how a proxied session ended: the outcome and reward on its trajectories, and for
    a failure an incident of the fast loop (idempotent per session unless the failure carries
    its own ``id``) with the session's last main turn as evidence."""
    if failure is not None:
        from incidents.models import Outcome

        outcome = Outcome.FAILURE
    if outcome is None and reward is None:
        raise DomainError("Give an outcome, a reward or a failure.", field="outcome")
    recordings_wait(2.0)
    # One transaction: an incident that cannot be made leaves the turns' outcome unchanged.
    with transaction.atomic():
        return _session_feedback_apply(
            project=project,
            session_id=session_id,
            outcome=outcome,
            reward=reward,
            failure=failure,
            actor_label=actor_label,
        )


def session_incident_id(session_id: str) -> str:
    """The external id of a session's failure incident: bounded and printable, whatever the
    session id is."""
    return "session:" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _session_feedback_apply(
    *,
    project: Project,
    session_id: str,
    outcome: str | None,
    reward: float | None,
    failure: dict[str, Any] | None,
    actor_label: str,
) -> FeedbackResult:
    from incidents.ingest import incidents_ingest
    from incidents.models import Trajectory
    from incidents.schemas import IncidentIn
    from incidents.services import session_outcome_record

    updated = session_outcome_record(
        project=project, session_id=session_id, outcome=outcome, reward=reward
    )
    turns = Trajectory.objects.filter(project=project, session_id=session_id)
    if failure is None:
        return FeedbackResult(session_id, updated, None, None, False)

    last = (
        turns.filter(turn_type="main").order_by("-occurred_at").first()
        or turns.order_by("-occurred_at").first()
    )
    messages: list[Any] = []
    tools: list[Any] = []
    if last is not None:
        messages = list(last.messages or [])
        if isinstance(last.response, dict) and last.response.get("role") == "assistant":
            messages.append(last.response)
        tools = list(last.tools or [])
    payload = {
        "id": failure.get("id") or session_incident_id(session_id),
        "agent": {"name": failure.get("agent") or (last.agent_name if last else "") or "proxy"},
        "policy_version": last.policy_version if last else None,
        "kind": failure.get("kind") or "wrong_answer",
        "severity": failure.get("severity") or "medium",
        "error": failure.get("error") or {},
        "messages": messages[-100:],
        "tools": tools,
        "feedback": {"text": failure.get("feedback") or "", "reward": reward},
        "metadata": {"source": "runtime.feedback", "trajectory_id": str(last.pk) if last else ""},
        "session_id": session_id,
    }
    try:
        item = IncidentIn.model_validate(payload)
    except ValidationError:  # recorded messages an incident cannot hold: keep the rest
        payload["messages"] = []
        payload["tools"] = []
        try:
            item = IncidentIn.model_validate(payload)
        except ValidationError as exc:
            first = (exc.errors(include_url=False) or [{}])[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise DomainError(
                f"The failure cannot be recorded as an incident ({where}: {first.get('msg', '')}).",
                code="invalid",
                field="failure",
            ) from exc
    result = incidents_ingest(project=project, items=[item], actor_label=actor_label)[0]
    return FeedbackResult(
        session_id, updated, result.incident_id, result.group_id, result.duplicate
    )
