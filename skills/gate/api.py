"""Admin API of the replay gate (``admin`` keys): request a gate for a candidate, read its
counts and examples. Thin: ``skills.gate.services`` and ``.selectors``."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from ninja import Router, Schema, Status

from base.auth import admin_auth
from base.errors import NotFound
from base.permissions import api_key_label
from base.requests import ApiRequest
from skills.gate import selectors, services
from skills.versions.selectors import version_for_project

router = Router(tags=["replay gate"], auth=admin_auth)


class ReplayPairOut(Schema):
    incident_id: UUID | None
    verdict: str
    method: str
    reason: str
    candidate_answer: str
    active_answer: str


class ReplayGateOut(Schema):
    id: int
    version: int
    baseline: int
    mode: str
    status: str
    wins: int
    ties: int
    losses: int
    calls: int
    tokens: int
    max_calls: int
    max_tokens: int
    capped: bool
    note: str
    created_at: datetime
    finished_at: datetime | None
    pairs: list[ReplayPairOut]


def _out(gate: Any, pairs: list) -> dict[str, Any]:
    return {
        "id": gate.pk,
        "version": gate.version.number,
        "baseline": gate.baseline_number,
        "mode": gate.project.replay_gate_mode,
        "status": gate.status,
        **{n: getattr(gate, n) for n in ("wins", "ties", "losses", "calls", "tokens",
                                          "max_calls", "max_tokens", "capped", "note",
                                          "created_at", "finished_at")},
        "pairs": pairs,
    }  # fmt: skip


@router.post("/versions/{number}/replay-gate", response={202: ReplayGateOut})
def request_replay_gate(request: ApiRequest, number: int) -> Status:
    """Replay the candidate ``number``'s failing conversations against the active version, on
    the slow queue; poll ``GET`` for the counts. A gate already waiting is answered as is."""
    version = version_for_project(request.project, number)
    gate = services.replay_gate_request(
        version=version, actor=None, actor_label=api_key_label(request.api_key)
    )
    gate, pairs = selectors.gate_with_pairs(version)
    return Status(202, _out(gate, pairs))


@router.get("/versions/{number}/replay-gate", response=ReplayGateOut)
def get_replay_gate(request: ApiRequest, number: int) -> dict[str, Any]:
    """The latest gate of version ``number``: win/tie/loss counts, cost, and each pair."""
    version = version_for_project(request.project, number)
    gate, pairs = selectors.gate_with_pairs(version)
    if gate is None:
        raise NotFound(f"v{number} has no replay gate.")
    return _out(gate, pairs)
