"""Demo data for the embedded run command: realistic incidents from two agents.

Everything here is a fixture. Skill proposals created for the demo are labelled
``Origin.DEMO_FIXTURE`` so nobody mistakes them for the output of a live LLM."""

from __future__ import annotations

import random
from datetime import timedelta

from django.utils import timezone

from incidents.schemas import IncidentIn
from incidents.services import incidents_ingest
from metaclaw_site.models import Project


def _tool_call(name: str, arguments: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _support_date_format(i: int) -> dict:
    order = 40000 + i * 37
    return {
        "agent": {"name": "support-bot", "version": "2.3.1"},
        "kind": "tool_error",
        "severity": "high",
        "error": {
            "type": "ToolArgumentError",
            "message": f"search_orders: invalid value '{['last week', 'yesterday', '03/11/2026'][i % 3]}' "
            f"for 'since' (expected ISO 8601 date), request {order}",
        },
        "messages": [
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
        "feedback": {"text": "The bot couldn't find my order.", "score": 1},
    }


def _support_refund_policy(i: int) -> dict:
    days = [14, 30, 45][i % 3]
    return {
        "agent": {"name": "support-bot", "version": "2.3.1"},
        "kind": "wrong_answer",
        "severity": "medium",
        "error": {
            "type": "PolicyMismatch",
            "message": f"Stated a {days}-day refund window; policy is 60 days for members",
        },
        "messages": [
            {
                "role": "user",
                "content": "I'm a member. Can I still return the blender I bought 5 weeks ago?",
            },
            {
                "role": "assistant",
                "content": f"Unfortunately our refund window is {days} days, so it's too late to return it.",
            },
        ],
        "feedback": {
            "text": "Wrong! Members get 60 days. Reviewer: answer should cite the member policy.",
            "reward": -1,
        },
    }


def _analyst_timeout(i: int) -> dict:
    return {
        "agent": {"name": "data-analyst", "version": "0.9.0"},
        "kind": "timeout",
        "severity": "high",
        "error": {
            "type": "QueryTimeout",
            "message": f"warehouse.query exceeded 30000 ms (scanned {120 + i * 7} GB)",
        },
        "messages": [
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
        "metadata": {"warehouse": "bq-prod", "api_key": "sk-live-51H8abcdefghijklmnop"},
    }


def _analyst_complaint(i: int) -> dict:
    return {
        "agent": {"name": "data-analyst", "version": "0.9.0"},
        "kind": "user_complaint",
        "severity": "low",
        "error": {"type": "", "message": "User said the chart had no units on the axes"},
        "messages": [
            {"role": "user", "content": "Plot weekly active users."},
            {"role": "assistant", "content": "Here is the chart: [chart.png] (x: week, y: value)"},
            {
                "role": "user",
                "content": "What's the unit on the y axis?? Thousands? This is useless.",
            },
        ],
        "feedback": {"text": "No units on the axes again.", "score": 2},
    }


def _support_guardrail(i: int) -> dict:
    return {
        "agent": {"name": "support-bot", "version": "2.3.1"},
        "kind": "guardrail",
        "severity": "critical",
        "error": {"type": "PIIGuardrail", "message": "Response contained a full card number"},
        "messages": [
            {"role": "user", "content": "Which card did I pay with?"},
            {"role": "assistant", "content": "You paid with card 4242 4242 4242 4242."},
        ],
    }


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
