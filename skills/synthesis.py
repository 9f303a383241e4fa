"""Turning an incident group into a proposed skill (the fast loop's service).

Placeholder until the LLM synthesis lands: without an LLM configured, a group waits as
"needs a skill" for a person to write one."""

from __future__ import annotations

from incidents import services as incident_services
from incidents.models import SynthesisStatus


def group_synthesize(*, group_id: int) -> str | None:
    if not incident_services.group_synthesis_claim(group_id=group_id):
        return None
    incident_services.group_synthesis_finish(group_id=group_id, status=SynthesisStatus.NEEDS_SKILL)
    return SynthesisStatus.NEEDS_SKILL
