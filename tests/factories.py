"""Test data builders. They go through services, as the product does."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from django.contrib.auth import get_user_model

from base import services
from base.models import Project
from metaclaw_site.projects import project_create
from skills.library.models import Author, Origin, SkillRevision
from skills.library.services import RevisionDraft, skill_revision_propose
from skills.versions.services import skill_revision_edit
from training.policy import services as policy_services

_seq = itertools.count(1)


def make_project(name: str | None = None, **fields: Any) -> Project:
    n = next(_seq)
    project = project_create(name=name or f"Project {n}", slug=f"{(name or 'project')}-{n}")
    if fields:
        Project.objects.filter(pk=project.pk).update(**fields)
        project.refresh_from_db()
    return project


def make_user(username: str | None = None, password: str = "pw-for-tests-123", **extra: Any):
    username = username or f"user{next(_seq)}"
    return services.user_create(username=username, password=password, **extra)


def make_member(project: Project, role: str = "viewer", username: str | None = None):
    user = make_user(username)
    services.membership_set(project=project, user=user, role=role)
    return user


def make_key(project: Project, scopes: list[str] | None = None, name: str = "test key") -> str:
    return services.api_key_create(
        project=project, name=name, scopes=scopes or ["ingest", "runtime"]
    ).secret


def tool_call_message(name: str, arguments: str, call_id: str = "c1") -> dict[str, Any]:
    """The assistant's turn that calls tool ``name`` with ``arguments`` (a JSON string)."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ],
    }


def incident_payload(client_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": client_id or f"inc-{next(_seq)}",
        "agent": {"name": "support-bot", "version": "1.0"},
        "kind": "tool_error",
        "severity": "high",
        "error": {
            "type": "ToolArgumentError",
            "message": "search_orders: invalid value 'last week' for 'since' (request 4411)",
        },
        "messages": [
            {"role": "user", "content": "Where is my order?"},
            tool_call_message("search_orders", '{"since": "last week"}', "call_1"),
            {"role": "tool", "tool_call_id": "call_1", "content": "error: bad date"},
        ],
        "feedback": {"text": "It failed", "score": 1},
        "metadata": {"region": "eu"},
    }
    payload.update(overrides)
    return payload


def training_settings_form(**overrides: Any) -> dict[str, str]:
    """The training settings form as a person fills it in; ``overrides`` change fields."""
    data = {
        "auto_train": "on",
        "mode": "either",
        "timezone": "Europe/Berlin",
        "weekly_windows": "mon-fri 01:00-05:00\nsat,sun 00:00-08:00",
        "ical_url": "",
        "ical_text": "",
        "traffic_threshold_rpm": "5",
        "traffic_idle_minutes": "30",
        "min_new_samples": "50",
        "max_runs_per_day": "1",
        "max_tokens_per_run": "500000",
        "max_sample_tokens": "1024",
        "eval_fraction": "0.2",
        "stale_after_minutes": "10",
        "backend": "local",
        "base_model": "smollm2-135m",
        "objective": "sft",
        "lora_rank": "8",
        "learning_rate": "0.0001",
        "batch_size": "4",
        "total_steps": "20",
        "backend_options": '{"num_threads": 2}',
    }
    data.update(overrides)
    return data


def tiny_local_training(**overrides: Any) -> dict[str, Any]:
    """Training settings for the tiny random model on the local backend (a few quick CPU
    steps); ``overrides`` add or change settings."""
    return {
        "backend": "local",
        "base_model": "tiny-random-smollm2",
        "backend_options": {"num_threads": min(2, os.cpu_count() or 1)},
        "learning_rate": 2e-2,
        "min_new_samples": 1,
        **overrides,
    }


def tinker_policy(project: Project, server: Any, **overrides: Any):
    """The project trains on ``server`` (a ``FakeTinkerServer``) with a byte tokenizer."""
    fields: dict[str, Any] = {
        "backend": "tinker",
        "base_model": "fake/tiny-model",
        "backend_options": {
            "base_url": server.url,
            "api_key": "tml-test-key",
            "tokenizer": "byte",
            "timeout": 10,
        },
        "batch_size": 2,
        "total_steps": 4,
        "min_new_samples": 1,
        **overrides,
    }
    return policy_services.idle_policy_update(project=project, **fields)


# A skill written in advance (a demo fixture), for tests of what happens to a revision.
ISO_DATES_DRAFT: dict[str, Any] = {
    "name": "Use ISO dates",
    "description": "When a tool wants a date.",
    "instructions": "Always pass dates as YYYY-MM-DD.",
    "origin": Origin.DEMO_FIXTURE,
}
# A skill as the live LLM proposes it, for tests of what reviewers are shown and sent.
LLM_DATE_ARGS_DRAFT: dict[str, Any] = {
    "name": "Normalise date arguments",
    "description": "When a tool takes a date argument.",
    "instructions": (
        "Convert relative dates like 'last week' to ISO 8601 before calling search_orders."
    ),
    "origin": Origin.LIVE_LLM,
}

# A skill a person wrote, as (slug, name, description, instructions) for ``make_human_revision``,
# and the questions the runtime tests ask of skills like it.
SEARCH_ORDERS_DATES = (
    "search-orders-dates",
    "Search orders with ISO dates",
    "When the search_orders tool rejects a relative date like 'last week' or 'yesterday'.",
    "Convert relative dates to ISO 8601 (YYYY-MM-DD) before calling search_orders.",
)
DATE_QUESTION = "Find my orders since last week, the search_orders tool says invalid date"
REFUND_QUESTION = "I want a refund, give me my money back for this order"


def make_revision(project: Project, slug: str = "iso-dates", **draft: Any) -> SkillRevision:
    """A proposed revision of skill ``slug``; ``draft`` overrides fields of ``ISO_DATES_DRAFT``."""
    fields = {**ISO_DATES_DRAFT, **draft}
    return skill_revision_propose(project=project, draft=RevisionDraft(slug=slug, **fields))


def make_llm_revision(project: Project, slug: str = "date-args", **draft: Any) -> SkillRevision:
    """A proposed revision of skill ``slug``; ``draft`` overrides fields of
    ``LLM_DATE_ARGS_DRAFT``."""
    return make_revision(project, slug, **{**LLM_DATE_ARGS_DRAFT, **draft})


def make_human_revision(project: Project, skill: tuple[str, str, str, str]) -> SkillRevision:
    """A proposed revision a person wrote; ``skill`` is (slug, name, description, instructions)."""
    slug, name, description, instructions = skill
    return make_revision(
        project,
        slug,
        name=name,
        description=description,
        instructions=instructions,
        author=Author.HUMAN,
        origin=Origin.HUMAN,
    )


# What a reviewer's edit in ``supersede_by_edit`` changes a revision to.
EDITED_DRAFT: dict[str, str] = {
    "name": "Normalise dates",
    "description": "When a tool takes a date.",
    "instructions": "Use ISO 8601.",
    "category": "general",
}


def supersede_by_edit(revision: SkillRevision, actor: Any) -> SkillRevision:
    """Edit ``revision`` as a reviewer does, which supersedes it; the new proposal."""
    return skill_revision_edit(revision=revision, actor=actor, **EDITED_DRAFT)


class ApiClient:
    def __init__(self, client) -> None:
        self.client = client

    def _headers(self, key: str | None) -> dict[str, str]:
        return {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: Any, key: str | None = None, raw: bool = False):
        data = body if raw else json.dumps(body)
        return self.client.post(
            path, data=data, content_type="application/json", **self._headers(key)
        )

    def get(self, path: str, key: str | None = None, **params: Any):
        return self.client.get(path, data=params, **self._headers(key))


def user_model():
    return get_user_model()
