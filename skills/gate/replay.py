"""What a replay sends and how: a recorded failing conversation cut before its failing step,
the system prompt a version gives it (the skills the proxy would inject), and one call to the
project's upstream model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from base.models import Project
from incidents.models import Incident
from incidents.selectors import failing_step, incident_messages
from skills.runtime import retrieval
from skills.runtime import upstream as runtime_upstream
from skills.runtime.policy import PolicySnapshot, estimate_tokens


class ReplayError(Exception):
    """The upstream could not answer (unreachable, an error status): the gate stops."""


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int


def conversation_until_failure(incident: Incident) -> list[dict[str, Any]]:
    """The incident's messages before the step that failed (the assistant message that made the
    failing call or gave the failing answer); empty when nothing is left to replay."""
    messages = incident_messages(incident)
    step = failing_step(incident)
    cut = step.call_index if step is not None and step.call_index is not None else len(messages)
    kept = messages[:cut]
    while kept and kept[-1].get("role") == "assistant":
        kept = kept[:-1]
    if not any(m.get("role") == "user" for m in kept):
        return []
    return kept


def messages_for(snapshot: PolicySnapshot, messages: list[dict[str, Any]]) -> list[Any]:
    """``messages`` with the skills ``snapshot`` would inject, exactly as the proxy does."""
    found = retrieval.skills_retrieve(
        snapshot=snapshot, query=retrieval.query_from_messages(messages)
    )
    if not found:
        return list(messages)
    return retrieval.messages_with_skills(
        messages, retrieval.skills_section(found, version=snapshot.number)
    )


def _requested_model(incident: Incident) -> str:
    metadata = incident.metadata if isinstance(incident.metadata, dict) else {}
    model = metadata.get("model")
    return model if isinstance(model, str) and model else settings.METACLAW["REPLAY_GATE_MODEL"]


def replay(
    *, project: Project, snapshot: PolicySnapshot, incident: Incident, messages: list[Any]
) -> Answer:
    """One call to the project's upstream (the proxy's: ``runtime.upstream``); the answer's
    text (or its tool calls, as JSON) and the tokens it cost (reported, else estimated)."""
    upstream = runtime_upstream.upstream_for(project)
    if not upstream.base_url:
        raise ReplayError("No upstream model is configured for this project.")
    model = runtime_upstream.upstream_model(
        requested=_requested_model(incident), snapshot=snapshot, model_map=upstream.model_map
    )
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0}
    if incident.tools:
        body["tools"] = incident.tools
    headers = {"content-type": "application/json"}
    if upstream.api_key:
        headers["authorization"] = f"Bearer {upstream.api_key}"
    timeout = float(getattr(settings, "UPSTREAM", {}).get("TIMEOUT_SECONDS", 60))
    try:
        response = httpx.post(
            f"{upstream.base_url}/chat/completions",
            json=body,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise ReplayError(f"The upstream model could not be reached: {exc!r}") from exc
    if response.status_code >= 400:
        raise ReplayError(f"The upstream model answered {response.status_code}.")
    try:
        data = response.json()
        message = data["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ReplayError("The upstream model's answer is not a chat completion.") from exc
    text = message.get("content") or ""
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False)
    if message.get("tool_calls"):
        text = (text + "\n" if text else "") + json.dumps(message["tool_calls"], ensure_ascii=False)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    if not tokens:
        tokens = estimate_tokens(json.dumps(messages, ensure_ascii=False)) + estimate_tokens(text)
    return Answer(text=text, tokens=tokens)
