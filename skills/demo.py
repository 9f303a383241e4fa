"""Demo data for the embedded run command: realistic incidents from two agents.

Everything here is a fixture. Skill proposals created for the demo are labelled
``Origin.DEMO_FIXTURE`` so nobody mistakes them for the output of a live LLM."""

from __future__ import annotations

import random
from datetime import timedelta

from django.utils import timezone

from base.models import Project
from incidents.ingest import incidents_ingest
from incidents.schemas import IncidentIn

SUPPORT_BOT = {"name": "support-bot", "version": "2.3.1"}
DATA_ANALYST = {"name": "data-analyst", "version": "0.9.0"}


def _tool_call(name: str, arguments: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _incident(
    agent: dict, kind: str, severity: str, error: tuple[str, str], messages: list, **extra: dict
) -> dict:
    """One incident as the intake API takes it; ``error`` is its (type, message)."""
    error_type, message = error
    return {
        "agent": dict(agent),
        "kind": kind,
        "severity": severity,
        "error": {"type": error_type, "message": message},
        "messages": messages,
        **extra,
    }


def _support_date_format(i: int) -> dict:
    order = 40000 + i * 37
    since = ["last week", "yesterday", "03/11/2026"][i % 3]
    return _incident(
        SUPPORT_BOT,
        "tool_error",
        "high",
        (
            "ToolArgumentError",
            f"search_orders: invalid value '{since}' for 'since' (expected ISO 8601 date), "
            f"request {order}",
        ),
        [
            {
                "role": "system",
                "content": "You are Acme's support assistant. Use tools to look up orders.",
            },
            {
                "role": "user",
                "content": f"Where is my order from last week? My email is jane.doe{i}@example.com",
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    _tool_call(
                        "search_orders",
                        '{"customer_email": "jane.doe@example.com", "since": "last week"}',
                        f"call_{order}",
                    )
                ],
            },
            {
                "role": "tool",
                "tool_call_id": f"call_{order}",
                "name": "search_orders",
                "content": "error: 'since' must be an ISO 8601 date like 2026-11-18",
            },
            {"role": "assistant", "content": "Sorry, I couldn't look up your orders right now."},
        ],
        feedback={"text": "The bot couldn't find my order.", "score": 1},
    )


def _support_refund_policy(i: int) -> dict:
    days = [14, 30, 45][i % 3]
    return _incident(
        SUPPORT_BOT,
        "wrong_answer",
        "medium",
        ("PolicyMismatch", f"Stated a {days}-day refund window; policy is 60 days for members"),
        [
            {
                "role": "user",
                "content": "I'm a member. Can I still return the blender I bought 5 weeks ago?",
            },
            {
                "role": "assistant",
                "content": f"Unfortunately our refund window is {days} days, so it's too late to return it.",
            },
        ],
        feedback={
            "text": "Wrong! Members get 60 days. Reviewer: answer should cite the member policy.",
            "reward": -1,
        },
    )


def _analyst_timeout(i: int) -> dict:
    return _incident(
        DATA_ANALYST,
        "timeout",
        "high",
        ("QueryTimeout", f"warehouse.query exceeded 30000 ms (scanned {120 + i * 7} GB)"),
        [
            {"role": "user", "content": "Revenue by region for the last 3 years, monthly."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    _tool_call("warehouse_query", '{"sql": "SELECT * FROM events"}', f"call_q{i}")
                ],
            },
            {
                "role": "tool",
                "tool_call_id": f"call_q{i}",
                "name": "warehouse_query",
                "content": "timeout after 30s",
            },
        ],
        metadata={"warehouse": "bq-prod", "api_key": "sk-live-51H8abcdefghijklmnop"},
    )


def _analyst_complaint(i: int) -> dict:
    return _incident(
        DATA_ANALYST,
        "user_complaint",
        "low",
        ("", "User said the chart had no units on the axes"),
        [
            {"role": "user", "content": "Plot weekly active users."},
            {"role": "assistant", "content": "Here is the chart: [chart.png] (x: week, y: value)"},
            {
                "role": "user",
                "content": "What's the unit on the y axis?? Thousands? This is useless.",
            },
        ],
        feedback={"text": "No units on the axes again.", "score": 2},
    )


def _support_guardrail(i: int) -> dict:
    return _incident(
        SUPPORT_BOT,
        "guardrail",
        "critical",
        ("PIIGuardrail", "Response contained a full card number"),
        [
            {"role": "user", "content": "Which card did I pay with?"},
            {"role": "assistant", "content": "You paid with card 4242 4242 4242 4242."},
        ],
    )


SCENARIOS = [
    (_support_date_format, 9),
    (_support_refund_policy, 6),
    (_analyst_timeout, 5),
    (_analyst_complaint, 4),
    (_support_guardrail, 2),
]


def demo_incidents_load(*, project: Project, seed: int = 7) -> int:
    """Ingest the demo incidents (idempotent: client ids are fixed). Returns how many exist."""
    rng = random.Random(seed)
    now = timezone.now()
    items: list[IncidentIn] = []
    for builder, count in SCENARIOS:
        for i in range(count):
            data = builder(i)
            data["id"] = f"demo-{builder.__name__.strip('_')}-{i}"
            data["occurred_at"] = now - timedelta(
                days=rng.randint(0, 13), minutes=rng.randint(0, 1440)
            )
            data["policy_version"] = 1
            items.append(IncidentIn.model_validate(data))
    results = incidents_ingest(project=project, items=items, actor_label="demo")
    return len(results)


# --- Demo skill proposals (fixtures, labelled as such) ------------------------------------------

DEMO_PROPOSALS: dict[str, dict] = {
    "_support_date_format": {
        "slug": "iso-dates-for-order-search",
        "name": "ISO dates for order search",
        "description": "When calling search_orders (or any tool with a date argument) with a "
        "date the user gave in words.",
        "instructions": "- Convert relative dates ('last week', 'yesterday') and local formats "
        "('03/11/2026') to an ISO 8601 date (YYYY-MM-DD) before calling `search_orders`; "
        "today's date is in the system prompt.\n- For a range like 'last week', pass the first "
        "day of the range as `since`.\n- Never pass the user's words as a tool argument.",
        "category": "common_mistakes",
        "examples": ["'last week' on 2026-11-25 → since=2026-11-16"],
        "diagnosis": "The agent passed the user's relative date straight into search_orders, "
        "whose 'since' argument only accepts ISO 8601 dates.",
    },
    "_support_refund_policy": {
        "slug": "member-refund-window",
        "name": "Member refund window",
        "description": "When a customer asks whether they can still return or refund an item.",
        "instructions": "- Check whether the customer is a member before answering.\n- Members "
        "may return items within **60 days**; everyone else within 30 days.\n- Quote the policy "
        "you applied; if membership is unknown, ask instead of guessing.",
        "category": "communication",
        "examples": [],
        "diagnosis": "The agent answered from a generic refund window and ignored that members "
        "get 60 days.",
    },
    "_analyst_timeout": {
        "slug": "bounded-warehouse-queries",
        "name": "Bounded warehouse queries",
        "description": "When writing SQL for warehouse_query over large event tables.",
        "instructions": "- Never `SELECT *` from event tables; select the needed columns.\n- "
        "Always filter on the partition column (`event_date`) for the requested period.\n- "
        "Aggregate in SQL (GROUP BY month, region) instead of fetching raw rows.",
        "category": "data_analysis",
        "examples": [],
        "diagnosis": "Unfiltered SELECT * scans over the whole events table exceeded the "
        "warehouse's 30 s limit.",
    },
    "_analyst_complaint": {
        "slug": "chart-axis-units",
        "name": "Label chart axes with units",
        "description": "When producing any chart or plot for a user.",
        "instructions": "- Label both axes with the quantity and its unit (e.g. 'weekly active "
        "users, thousands').\n- State the time zone and period of a time axis.",
        "category": "data_analysis",
        "examples": [],
        "diagnosis": "Charts were delivered without units, so users could not read them.",
    },
    "_support_guardrail": {
        "slug": "never-reveal-card-numbers",
        "name": "Never reveal card numbers",
        "description": "When a customer asks about a payment method or card on file.",
        "instructions": "- Refer to a card only by brand and last four digits ('Visa ending "
        "4242').\n- Never repeat a full card number, even if a tool returns one.",
        "category": "security",
        "examples": [],
        "diagnosis": "The agent repeated a full card number that a tool returned.",
    },
}


def demo_proposals_load(project: Project) -> int:
    """Skill proposals for the demo groups, labelled ``Origin.DEMO_FIXTURE`` (they were not
    written by a live LLM in this run). With an LLM configured there are none: the live LLM
    writes real proposals. Idempotent: groups that already have a revision are left alone.
    Returns how many demo proposals exist."""
    from incidents import services as incident_services
    from incidents.models import IncidentGroup, SynthesisStatus
    from skills.library.models import Author, Origin, SkillRevision
    from skills.library.services import RevisionDraft, skill_revision_propose
    from skills.synthesis import llm

    if llm.is_configured():
        return 0
    for builder_name, content in DEMO_PROPOSALS.items():
        prefix = f"demo-{builder_name.strip('_')}-"
        group = (
            IncidentGroup.objects.filter(project=project, incidents__client_id__startswith=prefix)
            .distinct()
            .first()
        )
        if group is None or group.skill_revisions.exclude(origin=Origin.EVIDENCE_DRAFT).exists():
            continue
        # Claim a group still waiting so no worker drafts it as well; a worker that got there
        # first keeps its (truthfully labelled) draft, and the fixture joins it.
        claimed = incident_services.group_synthesis_claim(group_id=group.pk)
        content = dict(content)
        diagnosis = content.pop("diagnosis")
        draft = RevisionDraft(
            author=Author.HUMAN,
            origin=Origin.DEMO_FIXTURE,
            source_groups=[group],
            source_incidents=list(group.incidents.order_by("-occurred_at")[:3]),
            diagnosis=f"{diagnosis}\n\n(Demo fixture: written in advance, not by a live LLM.)",
            prompt_version="demo-fixture",
            **content,
        )
        skill_revision_propose(project=project, draft=draft, actor_label="demo")
        if claimed:
            incident_services.group_synthesis_finish(
                group_id=group.pk, status=SynthesisStatus.PROPOSED
            )
    return SkillRevision.objects.filter(skill__project=project, origin=Origin.DEMO_FIXTURE).count()
