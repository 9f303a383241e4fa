"""The ingestion endpoints on the ASGI fast lane (``base.fast_lane``): a second door to
the answers of ``incidents/api.py``, without Django's middleware stack (which runs sync
middleware and the sync view in a thread per request: more than the work itself).

Same authentication, scope, rate limit, body limits, validation and bodies as the NinjaAPI's;
the service runs on a worker thread that hands its database connection back to the pool
afterwards. ``metaclaw_site/asgi.py`` (the composition root) registers ``ROUTES``."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from base.coalescing import Coalescer
from base.errors import DomainError
from base.fast_lane import (
    FastResponse,
    Route,
    api_admit,
    api_answer,
    api_body,
    api_domain_error,
    in_worker_thread,
)
from base.permissions import api_key_label
from incidents.api import incident_answers, incident_batch_answer, trajectory_batch_answer
from incidents.schemas import BatchIn, BatchOut, IncidentAccepted, IncidentIn

INGEST = ("ingest",)


async def _admitted(headers: dict[str, str], schema: Any, body: bytes):
    """The ingest key and the validated body, or the refusal to send instead."""
    api_key = await api_admit(headers, INGEST)
    if isinstance(api_key, FastResponse):
        return api_key
    payload = api_body(schema, body)
    if isinstance(payload, FastResponse):
        return payload
    return api_key, payload


def _answers(key: tuple[Any, int, str], payloads: list[IncidentIn]) -> list[tuple[int, dict]]:
    project, api_key_id, actor = key
    return incident_answers(project=project, payloads=payloads, actor=actor, api_key_id=api_key_id)


# Concurrent single incidents of one key share a transaction (``base.coalescing``).
_incidents = Coalescer(_answers, lambda: settings.METACLAW["INGEST_GROUP_COMMIT_MAX_ITEMS"])


async def post_incident(*, headers: dict[str, str], query: str, body: bytes) -> FastResponse:
    admitted = await _admitted(headers, IncidentIn, body)
    if isinstance(admitted, FastResponse):
        return admitted
    api_key, payload = admitted
    status, answer = await _incidents.call(
        (api_key.project, api_key.pk, api_key_label(api_key)), payload
    )
    return api_answer(status, _out(IncidentAccepted, answer))


async def post_incident_batch(*, headers: dict[str, str], query: str, body: bytes) -> FastResponse:
    return await _batch(headers, body, incident_batch_answer, with_actor=True)


async def post_trajectory_batch(
    *, headers: dict[str, str], query: str, body: bytes
) -> FastResponse:
    return await _batch(headers, body, trajectory_batch_answer, with_actor=False)


async def _batch(
    headers: dict[str, str], body: bytes, answer_batch: Any, *, with_actor: bool
) -> FastResponse:
    """A batch's 207 with one result per item, or the refusal of the whole batch (or of its
    key). ``with_actor``: the answer also takes the key's label as the actor."""
    admitted = await _admitted(headers, BatchIn, body)
    if isinstance(admitted, FastResponse):
        return admitted
    api_key, payload = admitted
    actor = {"actor": api_key_label(api_key)} if with_actor else {}
    try:
        answer = await in_worker_thread(answer_batch)(
            project=api_key.project, items=payload.items, api_key_id=api_key.pk, **actor
        )
    except DomainError as exc:
        return api_domain_error(exc)
    return api_answer(207, _out(BatchOut, answer))


def _out(schema: Any, answer: dict) -> dict:
    # What ninja sends for ``response=schema``: validated, with every field (defaults included).
    return schema.model_validate(answer).model_dump()


ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/api/v1/incidents"): Route(post_incident),
    ("POST", "/api/v1/incidents/batch"): Route(post_incident_batch),
    ("POST", "/api/v1/trajectories/batch"): Route(post_trajectory_batch),
}
