"""Test data builders. They go through services, as the product does."""

from __future__ import annotations

import itertools
import json
from typing import Any

from django.contrib.auth import get_user_model

from base import services
from base.models import Project
from metaclaw_site.projects import project_create
from skills.library.models import Author, Origin, SkillRevision
from skills.library.services import RevisionDraft, skill_revision_propose
from skills.versions.services import skill_revision_edit

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
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "search_orders",
                            "arguments": '{"since": "last week"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "error: bad date"},
        ],
        "feedback": {"text": "It failed", "score": 1},
        "metadata": {"region": "eu"},
    }
    payload.update(overrides)
    return payload


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


def supersede_by_edit(revision: SkillRevision, actor: Any) -> SkillRevision:
    """Edit ``revision`` as a reviewer does, which supersedes it; the new proposal."""
    return skill_revision_edit(
        revision=revision,
        actor=actor,
        name="Normalise dates",
        description="When a tool takes a date.",
        instructions="Use ISO 8601.",
        category="general",
    )


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
