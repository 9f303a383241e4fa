"""Effectiveness figures in the API: a revision's and a version's (``admin`` keys), and an
incident group's (``ingest`` or ``admin`` keys, like the other group reads)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, get_type_hints

from ninja import Router, Schema
from pydantic import create_model

from base.auth import admin_auth, read_auth
from base.requests import ApiRequest
from incidents.selectors import group_for_project
from skills.effectiveness import services
from skills.effectiveness.stats import RateComparison
from skills.versions import selectors

OPENAPI_OPERATION_PREFIX = "skills_api_effectiveness"

router = Router(tags=["effectiveness"])


# Every figure of a ``RateComparison`` (its ``as_dict``), so the two cannot drift apart.
ComparisonOut = create_model(
    "ComparisonOut",
    __base__=Schema,
    **{name: (hint, ...) for name, hint in get_type_hints(RateComparison).items()},
    verdict_label=(str, ...),
)


class DayOut(Schema):
    day: date
    incidents: int
    turns: int
    rate: float | None


class EffectivenessOut(Schema):
    subject: str
    activated_at: datetime | None
    window_days: int
    group_ids: list[int] | None
    method: str
    min_turns: int
    min_incidents: int
    target: ComparisonOut
    others: ComparisonOut | None
    verdict: str
    ineffective: bool
    harmful: bool
    revisions: list[dict[str, Any]]
    series: list[DayOut]
    marks: list[datetime]
    flagged_at: datetime | None = None
    flag_reason: str = ""


@router.get(
    "/skills/revisions/{revision_id}/effectiveness", auth=admin_auth, response=EffectivenessOut
)
def revision_effectiveness(request: ApiRequest, revision_id: int) -> dict:
    """Incidents of the revision's groups per 1,000 turns before and after it went live, with a
    95 % interval on the ratio, the verdict and the harm check on the other groups."""
    revision = selectors.revision_for_project(request.project, revision_id)
    measurement = services.revision_effectiveness(request.project, revision)
    return {
        **measurement.as_dict(),
        "flagged_at": revision.effectiveness_flagged_at,
        "flag_reason": revision.effectiveness_flag_reason,
    }


@router.get("/versions/{number}/effectiveness", auth=admin_auth, response=EffectivenessOut)
def version_effectiveness(request: ApiRequest, number: int) -> dict:
    """The same for the revisions a version added (every group for an adapter-only version)."""
    version = selectors.version_for_project(request.project, number)
    return services.version_effectiveness(request.project, version).as_dict()


@router.get("/groups/{group_id}/effectiveness", auth=read_auth, response=EffectivenessOut)
def group_effectiveness(request: ApiRequest, group_id: int) -> dict:
    """The group's rate around the first time a skill made for it went live."""
    group = group_for_project(request.project, group_id)
    return services.group_effectiveness(request.project, group).as_dict()
