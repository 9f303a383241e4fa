"""Tenant-scoped reads of incidents, groups and trajectories, shared by the API and pages.

A little past 500 lines on purpose: every read here starts from the same tenant scoping and
list filters (``PagedFilter``), and the group page's prefetching sits beside the lists it
shares them with; split by screen, each piece would repeat the scoping."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.db.models import Count, QuerySet, prefetch_related_objects
from django.db.models.functions import TruncDate
from django.utils import timezone

from base.errors import NotFound
from base.models import Project
from base.querysets import narrowed
from base.redaction import Redactor, head, redaction_summary
from incidents.models import Incident, IncidentGroup, Trajectory
from incidents.similarity import shared_terms

_Row = TypeVar("_Row", Incident, IncidentGroup)


def _narrowed(
    qs: QuerySet[_Row],
    equal_to: dict[str, Any],
    time_field: str,
    since: datetime | None,
    until: datetime | None,
) -> QuerySet[_Row]:
    """``qs`` narrowed to the fields in ``equal_to`` that were given (an empty filter matches
    everything, as it does in the query string) and to ``since <= time_field < until``."""
    return narrowed(qs, **equal_to, **{f"{time_field}__gte": since, f"{time_field}__lt": until})


def incidents_for_project(
    project: Project,
    *,
    status: str | None = None,
    kind: str | None = None,
    agent: str | None = None,
    group_id: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[Incident]:
    equal_to = {"status": status, "kind": kind, "agent_name": agent, "group_id": group_id}
    return _narrowed(
        Incident.objects.filter(project=project), equal_to, "occurred_at", since, until
    )


def groups_for_project(
    project: Project,
    *,
    status: str | None = None,
    kind: str | None = None,
    agent: str | None = None,
    synthesis_status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[IncidentGroup]:
    equal_to = {
        "status": status,
        "kind": kind,
        "agent_name": agent,
        "synthesis_status": synthesis_status,
    }
    # Groups merged into another are aliases of it (their fingerprints): not listed.
    return _narrowed(
        IncidentGroup.objects.filter(project=project, merged_into__isnull=True),
        equal_to,
        "last_seen",
        since,
        until,
    )


def incident_for_project(project: Project, incident_id: Any) -> Incident:
    incident = Incident.objects.filter(project=project, pk=incident_id).first()
    if incident is None:
        raise NotFound("No such incident in this project.")
    return incident


def group_for_project(project: Project, group_id: int) -> IncidentGroup:
    group = IncidentGroup.objects.filter(project=project, pk=group_id).first()
    if group is None:
        raise NotFound("No such incident group in this project.")
    return group


def group_for_page(project: Project, group_id: int) -> IncidentGroup:
    """``group_for_project`` with what the group's page shows of it: its skill proposals and
    their skills, fetched in two queries whatever their number (named by lookup: the skills
    app sits above this one)."""
    group = group_for_project(project, group_id)
    if group.merged_into_id is None:  # a merged group's page redirects to the one it joined
        prefetch_related_objects([group], "skill_revisions__skill")
    return group


def trajectories_for_project(project: Project) -> QuerySet[Trajectory]:
    return Trajectory.objects.filter(project=project)


def turns_for_project(
    project: Project,
    *,
    source: str | None = None,
    policy_version: int | None = None,
    skill: str | None = None,
    model: str | None = None,
    status: int | None = None,
    session_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> QuerySet[Trajectory]:
    """A project's recorded turns (trajectories), narrowed by what they ran with: ``skill`` is
    the slug of a skill injected into the turn, ``model`` the model it was sent to, ``status``
    the upstream's HTTP status."""
    equal_to = {
        "source": source,
        "policy_version": policy_version,
        "model": model,
        "status_code": status,
        "session_id": session_id,
    }
    qs = Trajectory.objects.filter(project=project)
    if skill:
        # jsonb containment (@>): the list holds an object with this slug.
        qs = qs.filter(skills_injected__contains=[{"slug": skill}])
    return _narrowed(qs, equal_to, "occurred_at", since, until)  # type: ignore[type-var]


def turn_for_project(project: Project, turn_id: Any) -> Trajectory:
    turn = Trajectory.objects.filter(project=project, pk=turn_id).first()
    if turn is None:
        raise NotFound("No such turn in this project.")
    return turn


def turn_retrieval(turn: Trajectory) -> dict[str, Any]:
    """What retrieval did for a proxied turn: the query it looked at, the threshold it applied
    (None for turns recorded before it was kept) and the skills injected, best first."""
    # Only the proxy writes this key; a client's own metadata (source=api) is not ours to read.
    metadata = turn.metadata if isinstance(turn.metadata, dict) else {}
    recorded = metadata.get("retrieval") if turn.source == "proxy" else None
    recorded = recorded if isinstance(recorded, dict) else {}
    skills = [s for s in turn.skills_injected or [] if isinstance(s, dict)]
    skills.sort(key=lambda s: (s.get("rank") or 0, -(s.get("score") or 0)))
    return {
        "query": recorded.get("query", ""),
        "min_score": recorded.get("min_score"),
        "skills": skills,
    }


def turn_retrieval_for_display(turn: Trajectory, *, personal_data: bool) -> dict[str, Any]:
    """``turn_retrieval`` with the query redacted for a page (``personal_data``: mask personal
    data too, for people who are not admins)."""
    shown = turn_retrieval(turn)
    shown["query"] = Redactor(personal_data=personal_data).text(shown["query"])
    return shown


def daily_counts(group_ids: list[int], *, days: int = 14) -> dict[int, list[int]]:
    """Incidents per day for each group over the last ``days`` days (oldest first), in one
    query whatever the number of groups: the sparklines of the group list."""
    today = timezone.now().date()
    start = today - timedelta(days=days - 1)
    series = {gid: [0] * days for gid in group_ids}
    if not group_ids:
        return series
    rows = (
        Incident.objects.filter(
            group_id__in=group_ids,
            occurred_at__gte=timezone.make_aware(datetime.combine(start, datetime.min.time())),
        )
        .annotate(day=TruncDate("occurred_at"))
        .values("group_id", "day")
        .annotate(n=Count("id"))
    )
    for row in rows:
        index = (row["day"] - start).days
        if 0 <= index < days:
            series[row["group_id"]][index] = row["n"]
    return series


def agents_for_project(project: Project) -> list[str]:
    return list(
        IncidentGroup.objects.filter(project=project)
        .order_by("agent_name")
        .values_list("agent_name", flat=True)
        .distinct()
    )


@dataclass(frozen=True)
class GroupFingerprint:
    """One fingerprint of a group: its own, or that of a group merged into it."""

    fingerprint: str
    normalized_message: str
    incidents: int
    own: bool
    merged_group_id: int | None


def group_fingerprints(group: IncidentGroup) -> list[GroupFingerprint]:
    counts = dict(
        Incident.objects.filter(group=group)
        .values_list("fingerprint")
        .annotate(n=Count("pk"))
        .values_list("fingerprint", "n")
    )
    aliases = {
        alias.fingerprint: alias
        for alias in IncidentGroup.objects.filter(merged_into=group).only(
            "id", "fingerprint", "normalized_message", "title"
        )
    }
    rows = [GroupFingerprint(group.fingerprint, group.normalized_message,
                             counts.pop(group.fingerprint, 0), True, None)]  # fmt: skip
    for fp, alias in sorted(aliases.items(), key=lambda item: item[1].pk):
        rows.append(
            GroupFingerprint(fp, alias.normalized_message, counts.pop(fp, 0), False, alias.pk)
        )
    for fp, n in sorted(counts.items()):
        rows.append(GroupFingerprint(fp, "", n, False, None))
    return rows


@dataclass(frozen=True)
class RelatedGroup:
    group: IncidentGroup
    reason: str


def related_groups(group: IncidentGroup) -> list[RelatedGroup]:
    """The groups linked to this one as the same problem in other words, each with why: what
    they share (kind, decisive tool, the words of their descriptions)."""
    out = []
    mine = group.normalized_message or group.title
    for other in group.related_groups.filter(merged_into__isnull=True).order_by("-last_seen"):
        parts = []
        if other.kind == group.kind:
            parts.append(f"same kind ({other.get_kind_display().lower()})")
        if other.tool_name and other.tool_name == group.tool_name:
            parts.append(f"same decisive tool ({other.tool_name})")
        words = shared_terms(mine, other.normalized_message or other.title)
        if words:
            parts.append("shared words: " + ", ".join(words))
        out.append(RelatedGroup(other, "; ".join(parts) or "similar description"))
    return out


# --- An incident as evidence: its task, outcome and failing step (pages and the fast loop) -----

# Older incidents carry these in their metadata (PostgreSQL keeps jsonb keys in its own order:
# looked up by name, never by position).
_METADATA_FALLBACKS = {
    "task": ("task", "instruction", "goal", "user_request"),
    "outcome": ("outcome", "final_state", "result"),
    "expected_outcome": ("expected_outcome", "expected", "expected_state"),
}
_ERRORISH = re.compile(
    r"(?i)\b(?:error|exception|traceback|failed|failure|invalid|denied|refused|forbidden"
    r"|unauthori[sz]ed|not found|timed? ?out)\b"
)


def incident_text(incident: Incident, name: str) -> str:
    """``task``, ``outcome`` or ``expected_outcome``: the field, else the metadata key that
    older clients sent it under."""
    value = getattr(incident, name) or ""
    if value or not isinstance(incident.metadata, dict):
        return value
    for key in _METADATA_FALLBACKS[name]:
        found = incident.metadata.get(key)
        if isinstance(found, str) and found.strip():
            return found.strip()
        if isinstance(found, (dict, list)) and found:
            return json.dumps(found, ensure_ascii=False, sort_keys=True)
    return ""


def incident_reward(incident: Incident) -> float | None:
    if incident.reward is not None:
        return incident.reward
    found = incident.metadata.get("reward") if isinstance(incident.metadata, dict) else None
    return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None


def message_text(message: dict[str, Any]) -> str:
    """A chat message's content as text (content parts joined, non-text parts named)."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", f"[{part.get('type', 'part')}]")) if isinstance(part, dict)
            else str(part)
            for part in content
        )  # fmt: skip
    if content is None:
        return ""
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def tool_calls(message: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """A chat message's well-formed tool calls: each call, its function, and the function's
    arguments as text (JSON when they came as an object)."""
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments", "")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            yield call, function, arguments


def incident_messages(incident: Incident) -> list[dict[str, Any]]:
    return [m for m in incident.messages or [] if isinstance(m, dict)]


def first_user_request(messages: list[dict[str, Any]]) -> int | None:
    """The index of the user's opening request: the first user message with text."""
    for index, message in enumerate(messages):
        if message.get("role") == "user" and message_text(message):
            return index
    return None


@dataclass(frozen=True)
class FailingStep:
    """Where the run failed: the assistant message that made the call (or gave the answer)
    and the tool message with its result."""

    call_index: int | None
    result_index: int | None
    tool_name: str = ""
    arguments: str = ""


def _errorish(text: str) -> bool:
    return bool(_ERRORISH.search(text[:600]))


def failing_step(incident: Incident) -> FailingStep | None:
    """The step that failed: the last tool result that reads as an error; else the last call
    of the incident's (decisive) tool; else the last tool call; else the last answer."""
    messages = incident_messages(incident)
    calls: list[tuple[int, str, str, str]] = []  # (index, call id, name, arguments)
    for index, message in enumerate(messages):
        for call, function, arguments in tool_calls(message):
            calls.append((index, str(call.get("id") or ""), str(function.get("name") or ""),
                          arguments))  # fmt: skip
    results = [i for i, m in enumerate(messages) if m.get("role") == "tool"]

    def result_of(call: tuple[int, str, str, str]) -> int | None:
        index, call_id = call[0], call[1]
        later = [i for i in results if i > index]
        by_id = [i for i in later if call_id and messages[i].get("tool_call_id") == call_id]
        return (by_id or later or [None])[0]

    def step(call: tuple[int, str, str, str]) -> FailingStep:
        return FailingStep(call[0], result_of(call), call[2], call[3])

    for result in reversed(results):
        if _errorish(message_text(messages[result])):
            owner = [c for c in calls if result_of(c) == result]
            if owner:
                return step(owner[-1])
            return FailingStep(None, result, str(messages[result].get("name") or ""))
    named = [c for c in calls if incident.tool_name and c[2] == incident.tool_name]
    if named or calls:
        return step((named or calls)[-1])
    answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return FailingStep(answers[-1], None) if answers else None


# Of each text shown to people who may not see personal data, at most this many characters.
DISPLAY_CHARS = 20_000


def _head(text: str) -> str:
    shown = head(text, DISPLAY_CHARS)
    if len(shown) == len(text):
        return text
    return f"{shown} […{len(text) - len(shown):,} more characters not shown]"


class IncidentDisplay:
    """An incident as a page shows it: its text redacted for the person looking, the task,
    outcome and reward with their metadata fallbacks, the opening request and the failing
    step marked. Every other attribute reads through to the incident."""

    def __init__(self, incident: Incident, **shown: Any) -> None:
        self._incident = incident
        self.__dict__.update(shown)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._incident, name)


def incidents_for_display(
    incidents: list[Incident], *, personal_data: bool
) -> list[IncidentDisplay]:
    """``incidents`` as pages show them. Secrets are always masked; ``personal_data`` masks
    names, addresses and the rest too (for people who may not see them: the slow detector's
    results are cached by content, see ``base.redaction``)."""
    shown = []
    for incident in incidents:
        redactor = Redactor(personal_data=personal_data)
        messages = incident_messages(incident)
        texts = [incident_text(incident, name) for name in _METADATA_FALLBACKS]
        texts += [incident.feedback_text, incident.error_message]
        texts += [message_text(m) for m in messages]
        arguments = []
        for message in messages:
            for call in message.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    value = function.get("arguments", "")
                    arguments.append(value if isinstance(value, str) else json.dumps(value))
        texts += arguments
        if personal_data:  # the detector's time grows with the text: long tool results are cut
            texts = [_head(text) for text in texts]
        redacted = redactor.many(texts)
        task, outcome, expected, feedback, error = redacted[:5]
        contents, calls = redacted[5 : 5 + len(messages)], iter(redacted[5 + len(messages) :])
        conversation = []
        for message, content in zip(messages, contents, strict=True):
            copy = {k: v for k, v in message.items() if k not in ("content", "tool_calls")}
            copy["content"] = content
            copy["tool_calls"] = [
                {"function": {"name": call["function"].get("name", ""),
                              "arguments": next(calls)}}
                for call in message.get("tool_calls") or []
                if isinstance(call, dict) and isinstance(call.get("function"), dict)
            ]  # fmt: skip
            conversation.append(copy)
        step = failing_step(incident)
        shown.append(
            IncidentDisplay(
                incident,
                task=task,
                outcome=outcome,
                expected_outcome=expected,
                feedback_text=feedback,
                error_message=error,
                messages=conversation,
                reward=incident_reward(incident),
                first_request_index=first_user_request(messages),
                failing_call_index=step.call_index if step else None,
                failing_result_index=step.result_index if step else None,
                redaction=redaction_summary(redactor.full_report()),
                personal_data_shown=not personal_data,
            )
        )
    return shown


# --- Onboarding: has a new project heard from its agent yet? ------------------------------


@dataclass(frozen=True)
class Onboarding:
    """How far a new project is: has the first incident arrived, and the first proxied turn?"""

    first_incident_at: datetime | None = None
    first_incident_group_id: int | None = None
    first_proxied_at: datetime | None = None
    first_proxied_model: str = ""
    first_proxied_status: int | None = None

    @property
    def complete(self) -> bool:
        return self.first_incident_at is not None and self.first_proxied_at is not None


def project_is_new(project: Project) -> bool:
    """Whether no agent has reported anything yet: no incident and no turn (the home page shows
    the onboarding panel then). Two index lookups, whatever the project's size.

    """
    return (
        not Incident.objects.filter(project=project).exists()
        and not Trajectory.objects.filter(project=project).exists()
    )


def project_onboarding(project: Project) -> Onboarding:
    """The first incident (any: the panel links to its group) and the first turn that came
    through the proxy, for the onboarding panel's waiting states (see ``project_is_new``)."""
    # Any row will do, so no ORDER BY: ``first()`` would sort by id over the whole table.
    incidents = Incident.objects.filter(project=project).values("received_at", "group_id")
    turns = Trajectory.objects.filter(project=project, source="proxy")
    incident = next(iter(incidents.order_by()[:1]), None)
    turn = next(iter(turns.order_by().values("received_at", "model", "status_code")[:1]), None)
    return Onboarding(
        first_incident_at=incident["received_at"] if incident else None,
        first_incident_group_id=incident["group_id"] if incident else None,
        first_proxied_at=turn["received_at"] if turn else None,
        first_proxied_model=turn["model"] if turn else "",
        first_proxied_status=turn["status_code"] if turn else None,
    )
