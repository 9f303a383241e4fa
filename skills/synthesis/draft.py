"""Without an LLM: a draft skill built from the group's evidence, for a person to complete."""

from __future__ import annotations

import logging
import re
from typing import Any

from django.db import transaction
from django.utils.text import slugify

from base.redaction import Redactor
from incidents.models import IncidentGroup, SynthesisStatus
from skills.library.models import Author, Category, Origin, RevisionStatus, Skill, SkillRevision
from skills.library.services import LIMITS, RevisionDraft, skill_revision_propose
from skills.synthesis.evidence import Evidence, clip
from skills.synthesis.outcome import SynthesisClaimLost, finish

logger = logging.getLogger(__name__)

# --- Without an LLM -------------------------------------------------------------------------


def propose_evidence_draft(
    group: IncidentGroup,
    evidence: Evidence,
    regressed: SkillRevision | None,
    provenance: dict[str, Any],
) -> str:
    """NEEDS_SKILL with a draft built from the evidence, for a person to complete. No LLM."""
    existing = SkillRevision.objects.filter(
        source_groups=group, status=RevisionStatus.PROPOSED
    ).first()
    if existing is not None:
        # A proposal awaits review already (an earlier draft, a demo fixture, an import).
        status = (
            SynthesisStatus.NEEDS_SKILL
            if existing.origin == Origin.EVIDENCE_DRAFT
            else SynthesisStatus.PROPOSED
        )
        finish(group, status, "", revision=existing)
        return status
    # Quoted into a draft that reviewers and chat channels see: personal data masked too.
    redactor = Redactor(personal_data=True)
    if regressed is not None:
        slug, parent = regressed.skill.slug, regressed
        category = regressed.skill.category
    else:
        base = slugify(f"{group.tool_name or group.agent_name} {group.error_type or group.kind}")
        base = re.sub(r"[-_]+", "-", base).strip("-")
        slug = (base or f"group-{group.pk}")[:50].strip("-")
        if Skill.objects.filter(project=group.project, slug=slug).exists():
            slug = f"{slug}-{group.pk}"
        parent, category = None, Category.COMMON_MISTAKES
    first = evidence.incidents[0] if evidence.incidents else None
    feedback = [i.feedback_text for i in evidence.incidents if i.feedback_text][:3]
    bullets = [f"- {redactor.text(clip(group.title, 300))} ({group.event_count} event(s))"]
    if group.tool_name:
        bullets.append(f"- Tool: `{group.tool_name}`")
    if first is not None and first.error_message:
        bullets.append(f"- Error: {redactor.text(clip(first.error_message, 400))}")
    bullets += [f'- User feedback: "{redactor.text(clip(text, 300))}"' for text in feedback]
    if regressed is not None:
        bullets.append(
            f"- The skill `{regressed.skill.slug}` r{regressed.number} was active and did not "
            "prevent it."
        )
    instructions = (
        f"> Draft built from the evidence of incident group #{group.pk}; no LLM is configured. "
        "Replace the TODO before approving.\n\n## What went wrong\n"
        + "\n".join(bullets)
        + "\n\n## What to do instead\n- TODO: the instruction that would have prevented this."
    )
    with transaction.atomic():
        revision = skill_revision_propose(
            project=group.project,
            draft=RevisionDraft(
                slug=slug,
                name=clip(f"Avoid: {redactor.text(group.title)}", LIMITS["name"]),
                description=clip(
                    f"When {group.agent_name} handles a {group.kind.replace('_', ' ')}"
                    + (f" with the {group.tool_name} tool" if group.tool_name else "")
                    + " (draft: a person should say when to use this).",
                    LIMITS["description"],
                ),
                instructions=instructions,
                category=category,
                author=Author.HUMAN,
                origin=Origin.EVIDENCE_DRAFT,
                parent=parent,
                source_groups=[group],
                source_incidents=evidence.incidents,
                diagnosis="No LLM is configured: a person should diagnose this group.",
                redactions=_merge_reports(evidence.redactions, redactor.report()),
                provenance=provenance,
                prompt_version="",
            ),
            actor_label="fast-loop",
        )
        if not finish(
            group,
            SynthesisStatus.NEEDS_SKILL,
            "No LLM is configured; a draft from the evidence awaits a person.",
            revision=revision,
        ):
            raise SynthesisClaimLost(f"Group {group.pk} is no longer RUNNING.")
    return SynthesisStatus.NEEDS_SKILL


def _merge_reports(*reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    totals: dict[str, int] = {}
    for report in reports:
        for item in report:
            totals[item["kind"]] = totals.get(item["kind"], 0) + int(item["count"])
    return [{"kind": k, "count": n} for k, n in sorted(totals.items(), key=lambda kv: -kv[1])]
