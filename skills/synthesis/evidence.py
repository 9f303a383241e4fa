"""What the LLM is shown of a group: its most informative incidents, redacted and datamarked
as untrusted data, trimmed to a token budget; and the group's text for similarity."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from base.redaction import Redactor
from base.sql import columns
from incidents.models import GroupStatus, Incident, IncidentGroup
from skills.library.models import SkillRevision
from skills.versions.models import VersionStatus

logger = logging.getLogger(__name__)

# Evidence sent to the LLM: at most this many incidents, about this many tokens (4 chars each).
MAX_EVIDENCE_INCIDENTS = 6
EVIDENCE_TOKEN_BUDGET = 3000
CANDIDATE_INCIDENTS = 60


@dataclass
class Evidence:
    incidents: list[Incident]
    text: str
    redactions: list[dict[str, Any]]
    tokens: int


# --- Evidence -------------------------------------------------------------------------------


def active_revision_for_group(group: IncidentGroup) -> SkillRevision | None:
    """The group's skill revision in the active policy, if a new incident came after it
    went live: the synthesis is then a revision of that skill."""
    if group.status != GroupStatus.REGRESSED:
        return None  # the regression receiver marks the group before asking for a revision
    revision = (
        SkillRevision.objects.filter(
            source_groups=group,
            policy_versions__project=group.project,
            policy_versions__status=VersionStatus.ACTIVE,
        )
        .select_related("skill")
        .order_by("-created_at")
        .first()
    )
    if revision is None:
        return None
    since = revision.status_changed_at or revision.created_at
    if not group.incidents.filter(received_at__gte=since).exists():
        return None
    return revision


def _informativeness(incident: Incident) -> float:
    score = 0.0
    if incident.feedback_text:
        score += 3
    if incident.feedback_score is not None or incident.reward is not None:
        score += 1
    if any(m.get("tool_calls") for m in incident.messages if isinstance(m, dict)):
        score += 2
    if incident.error_message:
        score += 1 + min(len(incident.error_message), 400) / 400
    score += min(len(incident.messages), 8) / 8
    return score


def gather_evidence(group: IncidentGroup, regressed: SkillRevision | None) -> Evidence:
    candidates = list(
        Incident.objects.raw(
            f"SELECT {columns(Incident)} FROM {Incident._meta.db_table} WHERE group_id = %s "
            "ORDER BY occurred_at DESC LIMIT %s",
            [group.pk, CANDIDATE_INCIDENTS],
        )
    )
    since = None
    if regressed is not None:
        since = regressed.status_changed_at or regressed.created_at
    seen: set[str] = set()
    ranked: list[tuple[float, int, Incident]] = []
    for position, incident in enumerate(candidates):
        # Different wording carries more information than the same failure twice.
        key = f"{incident.error_message[:200]}|{incident.feedback_text[:200]}"
        score = _informativeness(incident) - (2.5 if key in seen else 0)
        seen.add(key)
        if since is not None and incident.received_at >= since:
            score += 5  # evidence that the active skill did not work comes first
        ranked.append((score, -position, incident))
    ranked.sort(key=lambda item: (item[0], item[1]), reverse=True)

    redactor = Redactor()
    budget_chars = EVIDENCE_TOKEN_BUDGET * 4
    parts: list[str] = []
    chosen: list[Incident] = []
    used = 0
    for _, _, incident in ranked[:MAX_EVIDENCE_INCIDENTS]:
        block = _render_incident(len(chosen) + 1, incident, redactor, since)
        if chosen and used + len(block) > budget_chars:
            continue
        if len(block) > budget_chars - used:
            block = block[: max(400, budget_chars - used)] + "\n[…trimmed]"
        parts.append(block)
        chosen.append(incident)
        used += len(block)
    text = "\n\n".join(parts)
    return Evidence(
        incidents=chosen, text=text, redactions=redactor.report(), tokens=len(text) // 4
    )


def clip(text: str, limit: int) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render_message(message: dict[str, Any], redactor: Redactor) -> list[str]:
    role = str(message.get("role", "?"))
    lines: list[str] = []
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text")
        )
    label = role
    if role == "tool":
        label = f"tool {message.get('name') or message.get('tool_call_id') or ''}".strip()
    if content:
        limit = 300 if role == "system" else 600
        lines.append(f"[{label}] {redactor.text(clip(str(content), limit))}")
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        args = redactor.text(clip(str(function.get("arguments", "")), 400))
        lines.append(f"[{role} → tool call] {function.get('name', '?')}({args})")
    return lines


def _render_incident(number: int, incident: Incident, redactor: Redactor, since: Any | None) -> str:
    head = (
        f"### Incident {number} ({incident.kind}, severity {incident.severity}, agent "
        f"{incident.agent_name} {incident.agent_version}".rstrip()
        + (f", policy v{incident.policy_version}" if incident.policy_version else "")
        + ")"
    )
    if since is not None and incident.received_at >= since:
        head += " — happened while the skill was active"
    lines = [head]
    if incident.error_type or incident.error_message:
        error = f"{incident.error_type}: {incident.error_message}".strip(": ")
        lines.append("Error: " + redactor.text(clip(error, 800)))
    if incident.tool_name:
        lines.append(f"Tool: {incident.tool_name}")
    messages = [m for m in incident.messages if isinstance(m, dict)]
    if len(messages) > 10:
        omitted = len(messages) - 9
        messages = (
            messages[:1]
            + [{"role": "note", "content": f"{omitted} earlier messages"}]
            + (messages[-8:])
        )
    if messages:
        lines.append("Conversation:")
        for message in messages:
            lines.extend(_render_message(message, redactor))
    feedback = []
    if incident.feedback_text:
        feedback.append(f'"{redactor.text(clip(incident.feedback_text, 500))}"')
    if incident.feedback_score is not None:
        feedback.append(f"score {incident.feedback_score:g}")
    if incident.reward is not None:
        feedback.append(f"reward {incident.reward:g}")
    if feedback:
        lines.append("Feedback: " + ", ".join(feedback))
    if incident.metadata:
        metadata = json.dumps(redactor.json(incident.metadata), ensure_ascii=False)
        lines.append("Metadata: " + clip(metadata, 400))
    return "\n".join(lines)


def group_text(group: IncidentGroup) -> str:
    return group_text_of(group.title, group.tool_name)


def group_text_of(title: str, tool_name: str) -> str:
    if tool_name and tool_name not in title:
        return f"{title} tool {tool_name}"
    return title
