"""Admin API of canary releases (``admin`` keys): start, read with figures, stop, promote.
Thin: ``skills.canary.services`` and ``.selectors``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ninja import Field, Router, Schema, Status

from base.auth import admin_auth
from base.errors import NotFound
from base.permissions import api_key_label
from base.requests import ApiRequest
from skills.canary import selectors, services
from skills.canary.models import CanaryRelease
from skills.versions.selectors import version_for_project

router = Router(tags=["canary"], auth=admin_auth)


class CanaryIn(Schema):
    version: int = Field(ge=1)
    share_percent: int = Field(default=10, ge=1, le=50)
    margin_per_1000: float = Field(default=20.0, ge=0, le=1000)
    min_turns: int = Field(default=200, ge=1, le=10_000_000)


class CanaryEndIn(Schema):
    reason: str = Field(default="", max_length=2000)
    replaces: int | None = Field(default=None, ge=1)


class ArmOut(Schema):
    turns: int
    incidents: int
    rate: float


class CanaryOut(Schema):
    id: int
    version: int
    control: int
    share_percent: int
    margin_per_1000: float
    min_turns: int
    outcome: str
    started_at: datetime
    ended_at: datetime | None
    started_by: str
    ended_by: str
    end_reason: str
    canary: ArmOut
    control_arm: ArmOut
    z: float
    enough_evidence: bool
    rollback: bool


def _out(canary: CanaryRelease) -> dict[str, Any]:
    figures = selectors.canary_figures(canary).as_dict()
    return {
        "id": canary.pk,
        "version": canary.version.number,
        "control": canary.control_number,
        "share_percent": canary.share_percent,
        "margin_per_1000": canary.margin_per_1000,
        "min_turns": canary.min_turns,
        "outcome": canary.outcome,
        "started_at": canary.started_at,
        "ended_at": canary.ended_at,
        "started_by": canary.started_by_label,
        "ended_by": canary.ended_by_label,
        "end_reason": canary.end_reason,
        "canary": figures["canary"],
        "control_arm": figures["control"],
        "z": figures["z"],
        "enough_evidence": figures["enough_evidence"],
        "rollback": figures["rollback"],
    }


def _running(request: ApiRequest) -> CanaryRelease:
    canary = selectors.running_canary(request.project)
    if canary is None:
        raise NotFound("No canary is running.")
    return canary


@router.post("/canary", response={201: CanaryOut})
def start_canary(request: ApiRequest, payload: CanaryIn) -> Status:
    """Serve the candidate ``version`` to ``share_percent`` % of the sessions (by
    ``X-Session-Id`` at the proxy); rolled back automatically when its incidents per 1,000
    turns exceed control's by ``margin_per_1000`` once each arm has ``min_turns`` turns."""
    canary = services.canary_start(
        version=version_for_project(request.project, payload.version),
        actor=None,
        actor_label=api_key_label(request.api_key),
        share_percent=payload.share_percent,
        margin_per_1000=payload.margin_per_1000,
        min_turns=payload.min_turns,
    )
    return Status(201, _out(canary))


@router.get("/canary", response=CanaryOut)
def get_canary(request: ApiRequest) -> dict[str, Any]:
    """The running canary (else the latest one) with each arm's turns, incidents and rate."""
    canary = selectors.running_canary(request.project)
    if canary is None:
        latest = selectors.canaries_for_project(request.project, limit=1)
        if not latest:
            raise NotFound("This project has had no canary.")
        canary = latest[0]
    return _out(canary)


@router.post("/canary/stop", response=CanaryOut)
def stop_canary(request: ApiRequest, payload: CanaryEndIn | None = None) -> dict[str, Any]:
    canary = services.canary_stop(
        canary=_running(request),
        actor=None,
        actor_label=api_key_label(request.api_key),
        reason=payload.reason if payload else "",
    )
    return _out(canary)


@router.post("/canary/promote", response=CanaryOut)
def promote_canary(request: ApiRequest, payload: CanaryEndIn | None = None) -> dict[str, Any]:
    """Promote the canary's version to everyone (``POST /versions/{n}/promote``'s refusals
    apply: 409 when another version became active, or a required replay gate did not pass)."""
    canary = services.canary_promote(
        canary=_running(request),
        actor=None,
        actor_label=api_key_label(request.api_key),
        reason=payload.reason if payload else "",
        replaces=payload.replaces if payload else None,
    )
    return _out(canary)
