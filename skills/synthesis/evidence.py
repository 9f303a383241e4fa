"""What the LLM is shown of a group: its most informative incidents, redacted (secrets and
personal data, see ``base.redaction``), within a stated token budget; and the group's text for
similarity. A little past 500 lines on purpose: choosing, redacting (in one detector call per
group) and trimming are one pass over the same incidents under one budget.

The budget: ``METACLAW["EVIDENCE_TOKEN_BUDGET"]`` tokens (default 6,000) for the whole evidence
section, over at most ``METACLAW["EVIDENCE_INCIDENTS"]`` incidents (default 4). Tokens are
counted by ``estimate_tokens``: one token per 3.5 bytes of UTF-8. Measured against a Llama-2
tokenizer (32k words, coarser than GPT-4's) on agent traffic, prose runs 4.3 bytes a token and
JSON 3.8, so the estimate over-counts English and JSON and the budget is an upper bound; CJK
text (2.75 bytes a token there) is under-counted by about a fifth.

How it is spent, in this order:

1. The agent's policy (its system prompt, once for the group): the passages most similar to
   the failure (``skills.synthesis.passages``), at most ``POLICY_SHARE`` of the budget, in their
   order under their headings, not the policy's first few hundred characters.
2. Each incident's must-keep part, in order of informativeness: the task, the user's opening
   request, the failing step (the tool call and its result), the error, the outcome and the
   expected outcome, reward, score and feedback, each clipped to its cap in ``CAPS``. An
   incident whose must-keep part no longer fits is left out; the first one always fits (its
   caps shrink when the budget is smaller than its must-keep part).
3. What is left, shared among the incidents kept: the rest of each conversation, nearest the
   failing step first, and the metadata not shown yet. Left-out turns are marked as such.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from base.redaction import Redactor, redaction_summary
from incidents.models import GroupStatus, Incident, IncidentGroup
from incidents.provenance import groups_provenance
from incidents.selectors import (
    FailingStep,
    failing_step,
    first_user_request,
    incident_messages,
    incident_reward,
    incident_text,
    message_text,
    tool_calls,
)
from skills.library.models import SkillRevision
from skills.synthesis.passages import Passage, relevant_passages, render_passages
from skills.versions.models import VersionStatus

logger = logging.getLogger(__name__)

EVIDENCE_TOKEN_BUDGET = 6000
EVIDENCE_INCIDENTS = 4
CANDIDATE_INCIDENTS = 60
POLICY_SHARE = 0.25
POLICY_PASSAGES = 8
BYTES_PER_TOKEN = 3.5
# Must-keep parts, at most this many tokens each.
CAPS = {
    "task": 300,
    "request": 300,
    "call": 250,
    "result": 350,
    "error": 250,
    "outcome": 200,
    "expected": 200,
    "feedback": 250,
}
TURN_TOKENS = 200  # one context turn of the conversation, at most
METADATA_TOKENS = 120


def estimate_tokens(text: str) -> int:
    """The tokens ``text`` costs an LLM, estimated: one per 3.5 bytes of UTF-8."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / BYTES_PER_TOKEN)


def evidence_budget() -> tuple[int, int]:
    """``(tokens, incidents)`` for one prompt's evidence, from ``METACLAW``."""
    config = getattr(settings, "METACLAW", {})
    return (
        int(config.get("EVIDENCE_TOKEN_BUDGET", EVIDENCE_TOKEN_BUDGET)),
        int(config.get("EVIDENCE_INCIDENTS", EVIDENCE_INCIDENTS)),
    )


@dataclass
class Evidence:
    incidents: list[Incident]
    text: str
    # Every kind of secret and personal data looked for, with how many were masked (0 too).
    redactions: list[dict[str, Any]]
    tokens: int
    budget: int = EVIDENCE_TOKEN_BUDGET
    redaction_note: str = ""


def clip(text: str, limit: int) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _excerpt(redactor: Redactor, value: str, tokens: int) -> str:
    """``value`` redacted and cut to ``tokens`` (estimated)."""
    value = (value or "").strip()
    if not value:
        return ""
    text = redactor.excerpt(value, max(8, int(tokens * BYTES_PER_TOKEN)))
    while estimate_tokens(text) > tokens and len(text) > 8:
        text = clip(text, int(len(text) * 0.85))
    return text


# --- Which incidents ------------------------------------------------------------------------


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
    if incident.feedback_score is not None or incident_reward(incident) is not None:
        score += 1
    if incident_text(incident, "task") or incident_text(incident, "expected_outcome"):
        score += 1
    if any(m.get("tool_calls") for m in incident.messages if isinstance(m, dict)):
        score += 2
    if incident.error_message:
        score += 1 + min(len(incident.error_message), 400) / 400
    score += min(len(incident.messages), 8) / 8
    return score


def _ranked(candidates: list[Incident], since: Any | None) -> list[Incident]:
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
    return [incident for _, _, incident in ranked]


def gather_evidence(group: IncidentGroup, regressed: SkillRevision | None) -> Evidence:
    """The evidence of ``group`` within the budget (see the module's docstring). Redacts
    before anything is rendered; runs the PII detector, so call it outside transactions."""
    budget, most = evidence_budget()
    candidates = list(
        Incident.objects.filter(group=group).order_by("-occurred_at")[:CANDIDATE_INCIDENTS]
    )
    since = None
    if regressed is not None:
        since = regressed.status_changed_at or regressed.created_at
    ranked = _ranked(candidates, since)[: max(1, most)]
    redactor = _BatchRedactor()
    # Assembled twice: first to learn which texts it shows, which the PII detector then
    # analyses in one batch, then for real from those results. One call per excerpt made the
    # detector (and its cache's round trips) most of a synthesis's CPU.
    with redactor.recording():
        _assemble(group, ranked, since, redactor, budget)
    kept, text = _assemble(group, ranked, since, redactor, budget)
    # What the LLM is shown: excerpts redacted and then left out for space do not count.
    report = redactor.report_for(text)
    return Evidence(
        incidents=[block.incident for block in kept],
        text=text,
        redactions=report,
        tokens=estimate_tokens(text),
        budget=budget,
        redaction_note=redaction_summary(report).text,
    )


class _BatchRedactor(Redactor):
    """A redactor (personal data included) that remembers what it redacted and, while
    ``recording``, only notes what it is asked for (returning it unredacted), to redact all
    of it in one batch when the recording ends. A text asked for later is redacted then."""

    def __init__(self) -> None:
        super().__init__(personal_data=True)
        self._redacted: dict[str, str] = {}
        self._asked: list[str] | None = None

    @contextmanager
    def recording(self) -> Iterator[None]:
        self._asked = []
        try:
            yield
        finally:
            asked, self._asked = self._asked, None
        self.many(asked)

    def many(self, values: list[str]) -> list[str]:
        if self._asked is not None:
            self._asked.extend(values)
            return list(values)
        todo = [v for v in dict.fromkeys(values) if v not in self._redacted]
        if todo:
            self._redacted.update(zip(todo, super().many(todo), strict=True))
        return [self._redacted[v] for v in values]


def _assemble(
    group: IncidentGroup,
    ranked: list[Incident],
    since: Any | None,
    redactor: Redactor,
    budget: int,
) -> tuple[list[_Block], str]:
    """The incidents kept and the evidence text (see the module's docstring)."""
    blocks = [_Block(incident, redactor, since) for incident in ranked]
    policy = _policy_section(group, blocks, redactor, int(budget * POLICY_SHARE))
    remaining = budget - estimate_tokens(policy) if policy else budget
    kept: list[_Block] = []
    for block in blocks:
        need = block.core_tokens() + 2
        if kept and need > remaining:
            continue
        if not kept and need > remaining:
            block.shrink(remaining - 2)
        kept.append(block)
        remaining -= block.core_tokens() + 2
    for position, block in enumerate(kept):
        share = remaining // (len(kept) - position)
        remaining -= block.add_context(share)
    parts = [policy] if policy else []
    parts += [block.render(number) for number, block in enumerate(kept, start=1)]
    return kept, "\n\n".join(parts)


# --- The policy -------------------------------------------------------------------------------


def _policy_section(
    group: IncidentGroup, blocks: list[_Block], redactor: Redactor, budget: int
) -> str:
    policies: list[str] = []
    for block in blocks:
        for message in block.messages:
            if message.get("role") in ("system", "developer"):
                text = message_text(message).strip()
                if text and text not in policies:
                    policies.append(text)
    if not policies:
        return ""
    failure = "\n".join([group.title, *(block.failure_text() for block in blocks)])
    size = sum(len(p) for p in policies)
    versions = f"{len(policies)} versions, " if len(policies) > 1 else ""
    head = (
        f"## The agent's system prompt ({versions}{size:,} characters): the passages most "
        "related to this failure, in their order"
    )
    chosen, total = relevant_passages(
        policies,
        failure,
        budget=budget - estimate_tokens(head) - 10,
        count=estimate_tokens,
        limit=POLICY_PASSAGES,
    )
    redacted = [Passage(p.order, p.heading, t) for p, t in
                zip(chosen, redactor.many([p.text for p in chosen]), strict=True)]  # fmt: skip
    section = f"{head}\n{render_passages(redacted, total)}"
    while redacted and estimate_tokens(section) > budget:
        redacted.pop()  # the least similar of those chosen (redaction made it longer)
        section = f"{head}\n{render_passages(redacted, total)}"
    return section if redacted else ""


# --- One incident -----------------------------------------------------------------------------


@dataclass
class _Block:
    """One incident's evidence: the must-keep lines, then context added while it fits."""

    incident: Incident
    redactor: Redactor
    since: Any | None
    messages: list[dict[str, Any]] = field(init=False)
    step: FailingStep | None = field(init=False)
    request: int | None = field(init=False)
    caps: dict[str, int] = field(init=False)
    core: dict[str, str] = field(init=False)
    turns: dict[int, str] = field(init=False, default_factory=dict)
    metadata: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.messages = incident_messages(self.incident)
        self.step = failing_step(self.incident)
        self.request = first_user_request(self.messages)
        self.caps = dict(CAPS)
        self._render_core()

    def _render_core(self) -> None:
        incident, cap, r = self.incident, self.caps, self.redactor
        core: dict[str, str] = {}
        task = incident_text(incident, "task")
        core["task"] = _excerpt(r, task, cap["task"])
        if self.request is not None:
            request = message_text(self.messages[self.request])
            if request.strip() != task.strip():
                core["request"] = _excerpt(r, request, cap["request"])
        step = self.step
        if step is not None and step.call_index is not None:
            if step.tool_name:
                arguments = _excerpt(r, step.arguments, cap["call"])
                core["call"] = f"{step.tool_name}({arguments})"
            else:  # a failure without tools: the agent's answer
                answer = message_text(self.messages[step.call_index])
                core["call"] = _excerpt(r, answer, cap["call"])
        if step is not None and step.result_index is not None:
            result = message_text(self.messages[step.result_index]) or "(empty)"
            core["result"] = _excerpt(r, result, cap["result"])
        error = f"{incident.error_type}: {incident.error_message}".strip(": ")
        core["error"] = _excerpt(r, error, cap["error"])
        core["outcome"] = _excerpt(r, incident_text(incident, "outcome"), cap["outcome"])
        core["expected"] = _excerpt(r, incident_text(incident, "expected_outcome"), cap["expected"])
        core["feedback"] = _excerpt(r, incident.feedback_text, cap["feedback"])
        self.core = {k: v for k, v in core.items() if v}

    def shrink(self, tokens: int) -> None:
        """Cut the caps until the must-keep part fits ``tokens`` (30 tokens each at least)."""
        for _ in range(8):
            if self.core_tokens() <= tokens:
                return
            factor = max(0.3, tokens / max(1, self.core_tokens()))
            self.caps = {k: max(30, int(v * factor)) for k, v in self.caps.items()}
            self._render_core()

    def core_tokens(self) -> int:
        return estimate_tokens(self.render(0))

    def failure_text(self) -> str:
        """What the failure is about, to find the policy passages it touches."""
        parts = [self.core.get(k, "") for k in ("task", "call", "result", "error", "outcome",
                                                "expected", "feedback")]  # fmt: skip
        return "\n".join(p for p in parts if p)

    def add_context(self, tokens: int) -> int:
        """Add conversation turns (the last one, the user's, then those nearest the failing
        step), then the metadata, while they fit in ``tokens``; returns the tokens they cost."""
        start = self.core_tokens()
        shown = self._shown()
        anchor = self.step.call_index if self.step and self.step.call_index is not None else 0
        candidates = [
            i for i, m in enumerate(self.messages)
            if i not in shown and m.get("role") not in ("system", "developer")
        ]  # fmt: skip
        last = max(candidates, default=None)
        # The user's turns say what they wanted and what went wrong: they come first.
        user = {i for i in candidates if self.messages[i].get("role") == "user"}
        candidates.sort(key=lambda i: (i != last, i not in user, abs(i - anchor), i))
        for index in candidates:
            left = tokens - (self.core_tokens() - start)
            if left < 20:
                break
            if _raw_turn_tokens(self.messages[index]) > left + 10:
                continue  # too long even before redaction: not worth the detector's time
            line = self._turn(index)
            if not line:
                continue
            self.turns[index] = line
            if self.core_tokens() - start > tokens:
                del self.turns[index]
        metadata = self._metadata()
        if metadata:
            self.metadata = metadata
            if self.core_tokens() - start > tokens:
                self.metadata = ""
        return self.core_tokens() - start

    def _shown(self) -> set[int]:
        shown = set()
        if self.request is not None:
            shown.add(self.request)
        if self.step is not None:
            shown.update(i for i in (self.step.call_index, self.step.result_index) if i is not None)
        return shown

    def _turn(self, index: int) -> str:
        message = self.messages[index]
        role = str(message.get("role", "?"))
        label = role
        if role == "tool":
            label = f"tool {message.get('name') or message.get('tool_call_id') or ''}".strip()
        parts = []
        text = message_text(message)
        if text.strip():
            parts.append(f"[{label}] {_excerpt(self.redactor, text, TURN_TOKENS)}")
        for _call, function, arguments in tool_calls(message):
            arguments = _excerpt(self.redactor, arguments, TURN_TOKENS // 2)
            parts.append(f"[{role} → tool call] {function.get('name', '?')}({arguments})")
        return "\n".join(parts)

    def _metadata(self) -> str:
        metadata = self.incident.metadata if isinstance(self.incident.metadata, dict) else {}
        used = {"task", "instruction", "goal", "user_request", "outcome", "final_state",
                "result", "expected_outcome", "expected", "expected_state", "reward"}  # fmt: skip
        rest = {k: v for k, v in metadata.items() if k not in used}
        if not rest:
            return ""
        # Sorted: PostgreSQL returns jsonb keys in its own order, not the client's.
        text = json.dumps(self.redactor.json(rest), ensure_ascii=False, sort_keys=True)
        return text if estimate_tokens(text) <= METADATA_TOKENS else clip(text, METADATA_TOKENS * 3)

    def render(self, number: int) -> str:
        incident, core = self.incident, self.core
        head = (
            f"### Incident {number} ({incident.kind}, severity {incident.severity}, agent "
            f"{incident.agent_name} {incident.agent_version}".rstrip()
            + (f", policy v{incident.policy_version}" if incident.policy_version else "")
            + ")"
        )
        if self.since is not None and incident.received_at >= self.since:
            head += " — happened while the skill was active"
        lines = [head]
        if "task" in core:
            lines.append(f"Task: {core['task']}")
        lines += self._conversation()
        if "error" in core:
            lines.append(f"Error: {core['error']}")
        if incident.tool_name:
            lines.append(f"Tool: {incident.tool_name}")
        if "outcome" in core:
            lines.append(f"Outcome: {core['outcome']}")
        if "expected" in core:
            lines.append(f"Expected outcome: {core['expected']}")
        scores = []
        reward = incident_reward(incident)
        if reward is not None:
            scores.append(f"reward {reward:g}")
        if incident.feedback_score is not None:
            scores.append(f"feedback score {incident.feedback_score:g}")
        if scores:
            lines.append("Scored: " + ", ".join(scores))
        if "feedback" in core:
            lines.append(f'Feedback: "{core["feedback"]}"')
        if self.metadata:
            lines.append(f"Metadata: {self.metadata}")
        return "\n".join(lines)

    def _conversation(self) -> list[str]:
        entries: dict[int, str] = dict(self.turns)
        core, step = self.core, self.step
        if self.request is not None:
            request = core.get("request", "(the task above)")
            entries[self.request] = f"[user, opening request] {request}"
        if step is not None and step.call_index is not None and "call" in core:
            label = (
                "assistant → tool call, the failing step"
                if step.tool_name
                else ("assistant, the failing answer")
            )
            entries[step.call_index] = f"[{label}] {core['call']}"
        if step is not None and step.result_index is not None and "result" in core:
            name = step.tool_name or self.messages[step.result_index].get("name") or ""
            label = " ".join(["tool", str(name), "→ result of the failing step"]).replace("  ", " ")
            entries[step.result_index] = f"[{label}] {core['result']}"
        if not entries:
            return []
        lines = [f"Conversation ({len(self.messages)} messages; the system prompt is above):"]
        previous = -1
        for index in sorted(entries):
            skipped = [i for i in range(previous + 1, index)
                       if self.messages[i].get("role") not in ("system", "developer")]  # fmt: skip
            if skipped:
                lines.append(f"[… {len(skipped)} turn(s) left out …]")
            lines.append(entries[index])
            previous = index
        after = [i for i in range(previous + 1, len(self.messages))
                 if self.messages[i].get("role") not in ("system", "developer")]  # fmt: skip
        if after:
            lines.append(f"[… {len(after)} later turn(s) left out …]")
        return lines


def _raw_turn_tokens(message: dict[str, Any]) -> int:
    text = message_text(message)
    calls = json.dumps(message.get("tool_calls") or "", ensure_ascii=False)
    return min(estimate_tokens(text), TURN_TOKENS) + min(estimate_tokens(calls), TURN_TOKENS) + 8


def group_provenance(group: IncidentGroup) -> dict[str, Any]:
    """How many distinct sessions, end users, agents, API keys and sources (the end user, else
    the session, else the key) the group's incidents come from: stored with its proposal."""
    return groups_provenance([group.pk])


def group_text(group: IncidentGroup) -> str:
    return group_text_of(group.title, group.tool_name)


def group_text_of(title: str, tool_name: str) -> str:
    if tool_name and tool_name not in title:
        return f"{title} tool {tool_name}"
    return title
