"""Admin API of the fast loop: ask it to try a group again. ``admin`` keys only."""

from __future__ import annotations

from ninja import Router, Schema, Status

from base.auth import admin_auth
from base.permissions import api_key_label
from base.requests import ApiRequest
from incidents import selectors as incident_selectors
from skills.synthesis import services as synthesis

# Operation ids as before this endpoint moved here from the library's API (see
# metaclaw_site.api); it keeps that router's tag too.
OPENAPI_OPERATION_PREFIX = "skills_api_library"

router = Router(tags=["skill library"], auth=admin_auth)


class RetryOut(Schema):
    group_id: int
    synthesis_status: str


@router.post(
    "/groups/{group_id}/retry-synthesis",
    response={202: RetryOut},
    summary="Ask the fast loop to try a failed (or no-skill) group again",
)
def retry_synthesis(request: ApiRequest, group_id: int):
    group = incident_selectors.group_for_project(request.project, group_id)
    group = synthesis.group_synthesis_retry(
        group=group, actor=None, actor_label=api_key_label(request.api_key)
    )
    group.refresh_from_db(fields=["synthesis_status"])
    return Status(202, RetryOut(group_id=group.pk, synthesis_status=group.synthesis_status))
