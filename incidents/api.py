"""Ingestion and read endpoints. Thin: validate, call a service or selector, shape the answer."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.conf import settings
from ninja import Query, Router, Status
from pydantic import ValidationError as PydanticValidationError

from base.api_shapes import PagedFilter, pydantic_errors
from base.auth import admin_auth, ingest_auth, read_auth
from base.errors import DomainError
from base.models import Project
from base.permissions import api_key_label
from base.requests import ApiRequest
from incidents import ingest, provenance, selectors, services
from incidents.schemas import (
    AbusiveSourceIn,
    AbusiveSourceOut,
    BatchIn,
    BatchOut,
    GroupFingerprintOut,
    GroupMergeIn,
    GroupOut,
    GroupPage,
    GroupSplitIn,
    GroupStatusIn,
    IncidentAccepted,
    IncidentIn,
    IncidentOut,
    IncidentPage,
    ProvenanceOut,
    RelatedGroupOut,
    TrajectoryIn,
)

router = Router(tags=["incidents"])


# --- Answers shared by both doors: these views, and incidents.fast_lane on the ASGI fast lane


def incident_answer(
    *, project: Project, payload: IncidentIn, actor: str, api_key_id: int | None = None
) -> tuple[int, dict]:
    """Store one incident: the status and body of ``POST /incidents``."""
    (answer,) = incident_answers(
        project=project, payloads=[payload], actor=actor, api_key_id=api_key_id
    )
    return answer


def incident_answers(
    *, project: Project, payloads: list[IncidentIn], actor: str, api_key_id: int | None = None
) -> list[tuple[int, dict]]:
    """Store several requests' incidents in one transaction (the fast lane's group commit):
    each one's status and body of ``POST /incidents``, as if it had come alone. A client id
    that two of them share is stored once; the later one is answered as a repeat."""
    results = ingest.incidents_ingest(
        project=project, items=payloads, actor_label=actor, api_key_id=api_key_id
    )
    return [
        (_status_of(result), {**_result_fields(result), "warnings": _warnings(payload)})
        for result, payload in zip(results, payloads, strict=True)
    ]


def _warnings(item: IncidentIn | TrajectoryIn) -> list[dict]:
    """What the client should know about how its input was stored: each unknown top-level
    field kept in metadata (never dropped silently)."""
    return [
        {
            "field": name,
            "message": f"Not a known field: kept in metadata under '{name}'.",
            "type": "moved_to_metadata",
        }
        for name in item.moved_to_metadata
    ]


def _status_of(result: ingest.IngestResult) -> int:
    return 200 if result.duplicate else 202


def _result_fields(result: ingest.IngestResult) -> dict:
    return {
        "id": result.incident_id,
        "client_id": result.client_id,
        "group_id": result.group_id,
        "status": result.status,
        "duplicate": result.duplicate,
    }


def incident_batch_answer(
    *, project: Project, items: list[Any], actor: str, api_key_id: int | None = None
) -> dict:
    """Store a batch of incidents: the body of ``POST /incidents/batch`` (207). Raises
    ``DomainError`` for a batch over ``BATCH_MAX_ITEMS``."""
    _check_batch_size(items)
    valid, invalid = _validate_items(items, IncidentIn)
    stored = (
        ingest.incidents_ingest(
            project=project,
            items=[item for _, item in valid],
            actor_label=actor,
            api_key_id=api_key_id,
        )
        if valid
        else []
    )
    results = [
        # An item's "status" is its HTTP status, not the incident's.
        {"index": index, **_result_fields(result), "status": _status_of(result)}
        for (index, _), result in zip(valid, stored, strict=True)
    ]
    _add_warnings(results, valid)
    return _batch_body(results, invalid)


def trajectory_batch_answer(
    *, project: Project, items: list[Any], api_key_id: int | None = None
) -> dict:
    """Store a batch of turns: the body of ``POST /trajectories/batch`` (207)."""
    _check_batch_size(items)
    valid, invalid = _validate_items(items, TrajectoryIn)
    stored = (
        ingest.trajectories_ingest(
            project=project, items=[item for _, item in valid], api_key_id=api_key_id
        )
        if valid
        else []
    )
    results = [
        {
            "index": index,
            "status": 200 if duplicate else 202,
            "id": trajectory_id,
            "client_id": item.id,
            "duplicate": duplicate,
        }
        for (index, item), (trajectory_id, duplicate) in zip(valid, stored, strict=True)
    ]
    _add_warnings(results, valid)
    return _batch_body(results, invalid)


def _add_warnings(results: list[dict], valid: list[tuple[int, Any]]) -> None:
    # Only on the items that have some: a clean 1,000-item batch answers as before.
    for result, (_, item) in zip(results, valid, strict=True):
        if item.moved_to_metadata:
            result["warnings"] = _warnings(item)


@router.post(
    "/incidents",
    auth=ingest_auth,
    response={200: IncidentAccepted, 202: IncidentAccepted},
    summary="Report one incident",
)
def post_incident(request: ApiRequest, payload: IncidentIn):
    """Store one incident and group it. 202 when stored now; 200 with the stored incident when
    this client id was seen before (nothing is stored twice). `warnings` names each field the
    schema does not know, kept in metadata."""
    return Status(
        *incident_answer(
            project=request.project,
            payload=payload,
            actor=api_key_label(request.api_key),
            api_key_id=request.api_key.pk,
        )
    )


def _validate_items(
    items: list[Any], schema: type
) -> tuple[list[tuple[int, Any]], dict[int, list]]:
    valid: list[tuple[int, Any]] = []
    invalid: dict[int, list] = {}
    for index, raw in enumerate(items):
        try:
            valid.append((index, schema.model_validate(raw)))
        except PydanticValidationError as exc:
            invalid[index] = pydantic_errors(exc)
    return valid, invalid


def _check_batch_size(items: list[Any]) -> None:
    limit = settings.METACLAW["BATCH_MAX_ITEMS"]
    if len(items) > limit:
        raise DomainError(f"A batch holds at most {limit} items; got {len(items)}.", field="items")


@router.post(
    "/incidents/batch",
    auth=ingest_auth,
    response={207: BatchOut},
    summary="Report up to 1,000 incidents; per-item results",
)
def post_incident_batch(request: ApiRequest, payload: BatchIn):
    """Each item is validated and stored on its own: good items are stored even when others
    fail. Per-item status: 202 stored, 200 duplicate client id, 422 invalid (with errors)."""
    return Status(
        207,
        incident_batch_answer(
            project=request.project,
            items=payload.items,
            actor=api_key_label(request.api_key),
            api_key_id=request.api_key.pk,
        ),
    )


@router.post(
    "/trajectories/batch",
    auth=ingest_auth,
    response={207: BatchOut},
    tags=["trajectories"],
    summary="Report ordinary turns for the slow loop; per-item results",
)
def post_trajectory_batch(request: ApiRequest, payload: BatchIn):
    return Status(
        207,
        trajectory_batch_answer(
            project=request.project, items=payload.items, api_key_id=request.api_key.pk
        ),
    )


def _batch_body(stored: list[dict], invalid: dict[int, list]) -> dict:
    """207 with one result per item, in request order (like Langfuse's batch ingestion).

    Results are plain dicts: ninja validates them against BatchOut once, where Schema objects
    would be read back attribute by attribute (a third of a 1,000-item batch's time)."""
    results = stored + [
        {"index": index, "status": 422, "errors": errors} for index, errors in invalid.items()
    ]
    results.sort(key=lambda r: r["index"])
    duplicates = sum(1 for r in stored if r["duplicate"])
    return {
        "accepted": len(stored) - duplicates,
        "duplicates": duplicates,
        "rejected": len(invalid),
        "results": results,
    }


class _ListFilter(PagedFilter):
    """What both lists filter on."""

    status: str | None = None
    kind: str | None = None
    agent: str | None = None


class IncidentFilter(_ListFilter):
    group: int | None = None


class GroupFilter(_ListFilter):
    synthesis_status: str | None = None


@router.get("/incidents", auth=read_auth, response=IncidentPage, summary="List incidents")
def list_incidents(request: ApiRequest, filters: Query[IncidentFilter]):
    narrowing = filters.narrowing()
    qs = selectors.incidents_for_project(
        request.project, group_id=narrowing.pop("group"), **narrowing
    )
    return filters.page(qs, time_field="occurred_at")


@router.get("/incidents/{incident_id}", auth=read_auth, response=IncidentOut)
def get_incident(request: ApiRequest, incident_id: UUID):
    return selectors.incident_for_project(request.project, incident_id)


@router.get("/groups", auth=read_auth, response=GroupPage, summary="List incident groups")
def list_groups(request: ApiRequest, filters: Query[GroupFilter]):
    qs = selectors.groups_for_project(request.project, **filters.narrowing())
    return filters.page(qs, time_field="last_seen")


@router.get("/groups/{group_id}", auth=read_auth, response=GroupOut)
def get_group(request: ApiRequest, group_id: int):
    return selectors.group_for_project(request.project, group_id)


@router.post("/groups/{group_id}/status", auth=admin_auth, response=GroupOut)
def set_group_status(request: ApiRequest, group_id: int, payload: GroupStatusIn):
    group = selectors.group_for_project(request.project, group_id)
    return services.group_set_status(
        group=group, status=payload.status, actor=None, actor_label=api_key_label(request.api_key)
    )


@router.post("/groups/{group_id}/merge", auth=admin_auth, response=GroupOut)
def merge_groups(request: ApiRequest, group_id: int, payload: GroupMergeIn):
    """Merge the named groups into this one (Sentry's merge): their incidents, the incidents
    that arrive later with their fingerprints, and their proposals follow it. Audited."""
    group = selectors.group_for_project(request.project, group_id)
    return services.groups_merge(
        project=request.project,
        target_id=group.pk,
        source_ids=payload.group_ids,
        actor=None,
        actor_label=api_key_label(request.api_key),
    )


@router.post("/groups/{group_id}/split", auth=admin_auth, response=list[GroupOut])
def split_group(request: ApiRequest, group_id: int, payload: GroupSplitIn):
    """Split incidents off by fingerprint (Sentry's unmerge); returns the groups split off."""
    group = selectors.group_for_project(request.project, group_id)
    return services.group_split(
        project=request.project,
        group_id=group.pk,
        fingerprints=payload.fingerprints,
        actor=None,
        actor_label=api_key_label(request.api_key),
    )


@router.get("/groups/{group_id}/fingerprints", auth=read_auth, response=list[GroupFingerprintOut])
def group_fingerprints(request: ApiRequest, group_id: int):
    """The wordings grouped here: the group's own fingerprint and those merged into it."""
    return selectors.group_fingerprints(selectors.group_for_project(request.project, group_id))


@router.get("/groups/{group_id}/related", auth=read_auth, response=list[RelatedGroupOut])
def related_groups(request: ApiRequest, group_id: int):
    """Groups that look like the same problem in other words, each with why."""
    group = selectors.group_for_project(request.project, group_id)
    return [
        {
            "id": item.group.pk,
            "title": item.group.title,
            "kind": item.group.kind,
            "tool_name": item.group.tool_name,
            "event_count": item.group.event_count,
            "reason": item.reason,
        }
        for item in selectors.related_groups(group)
    ]


@router.get("/groups/{group_id}/provenance", auth=read_auth, response=ProvenanceOut)
def group_provenance(request: ApiRequest, group_id: int):
    """Distinct sessions, end users, agents, API keys and sources behind the group's incidents
    (a source: the end user, else the session, else the API key)."""
    group = selectors.group_for_project(request.project, group_id)
    return provenance.groups_provenance([group.pk])


@router.get("/abusive-sources", auth=admin_auth, response=list[AbusiveSourceOut])
def list_abusive_sources(request: ApiRequest):
    return provenance.abusive_sources_for_project(request.project)


@router.post("/abusive-sources", auth=admin_auth, response={201: AbusiveSourceOut})
def mark_abusive_source(request: ApiRequest, payload: AbusiveSourceIn):
    """Mark a session or end user as abusive: later datasets drop its samples and proposals
    whose evidence came from it are flagged. Idempotent. Audited."""
    mark = services.abusive_source_mark(
        project=request.project,
        kind=payload.kind,
        value=payload.value,
        reason=payload.reason,
        actor=None,
        actor_label=api_key_label(request.api_key),
    )
    return Status(201, mark)


@router.delete("/abusive-sources/{mark_id}", auth=admin_auth, response={204: None})
def unmark_abusive_source(request: ApiRequest, mark_id: int):
    services.abusive_source_unmark(
        project=request.project,
        mark_id=mark_id,
        actor=None,
        actor_label=api_key_label(request.api_key),
    )
    return Status(204, None)
