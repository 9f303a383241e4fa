"""The fast loop's service: turn an incident group into a proposed skill revision.

``group_synthesize`` claims the group (one synthesis in flight per group), gathers its evidence
(the most informative incidents, redacted, trimmed to a token budget) and the most similar
existing skills, asks the LLM for a structured answer (``new_skill`` | ``revise_skill`` |
``no_skill``), validates it (one retry with the validation error), catches near-duplicates
(a "new" skill too close to an existing one becomes a revision of it), links related groups,
and stores a PROPOSED revision. The LLM is never called inside a database transaction.

Without an LLM configured the group becomes NEEDS_SKILL with a draft built from its evidence.
A project over its daily token budget leaves the group in BUDGET; the sweep puts it back in the
queue when the budget allows. Transient LLM errors release the group to WAITING and raise
``SynthesisRetryLater`` for the task to retry with backoff; after ``MAX_ATTEMPTS`` claims, or
on a permanent error, the group is FAILED with the reason (and a person can retry it).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from base import permissions
from base.errors import Conflict
from base.models import Project, Role
from base.services import audit_record
from incidents import services as incident_services
from incidents.models import IncidentGroup, SynthesisStatus
from skills.library.embeddings import get_embedder, skill_text
from skills.library.models import Author, Origin, SkillRevision
from skills.library.services import RevisionDraft, skill_revision_propose
from skills.synthesis import llm, similar
from skills.synthesis.draft import propose_evidence_draft
from skills.synthesis.evidence import (
    Evidence,
    active_revision_for_group,
    gather_evidence,
    group_text,
)
from skills.synthesis.models import LlmUsage
from skills.synthesis.outcome import SynthesisClaimLost, audit_outcome, finish
from skills.synthesis.prompt import (
    ANSWER_SCHEMA,
    InvalidAnswer,
    Proposal,
    prompt_messages,
    validate,
)

logger = logging.getLogger(__name__)

PROMPT_VERSION = "synth-2026-11.1"
# Claims of one group (task retries and sweeps together) before a transient error is final.
MAX_ATTEMPTS = 5


# What ``group_synthesize`` returns for a group merged into the group of its failure mode.
MERGED = "merged"


class SynthesisRetryLater(Exception):
    """A transient LLM error: the group is WAITING again; retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- Entry points ---------------------------------------------------------------------------


def group_synthesize(*, group_id: int) -> str | None:
    """Synthesise a skill for a WAITING group. Idempotent: returns None when another worker
    holds the claim or the group no longer waits; otherwise the group's new synthesis status.

    Raises ``SynthesisRetryLater`` after releasing the group on a transient LLM error."""
    group = incident_services.group_synthesis_claim(group_id=group_id)
    if group is None:
        return None
    try:
        # A new wording of a failure mode that has a group already joins it: one group, one
        # skill. The group it joined is asked for synthesis again if the merge brings news.
        if group.events_at_synthesis == 0 and similar.merge_into_similar_group(group):
            return MERGED
        return _synthesize_claimed(group)
    except SynthesisClaimLost:
        logger.warning("Group %s was released while it was synthesised; result dropped.", group_id)
        return None
    except llm.LlmTransientError as exc:
        if group.synthesis_attempts >= MAX_ATTEMPTS:
            finish(group, SynthesisStatus.FAILED, f"{exc} (gave up after {MAX_ATTEMPTS} attempts)")
            return SynthesisStatus.FAILED
        incident_services.group_synthesis_finish(
            group_id=group.pk, status=SynthesisStatus.WAITING, error=f"Retrying: {exc}"
        )
        raise SynthesisRetryLater(str(exc), retry_after=exc.retry_after) from exc
    except llm.LlmError as exc:
        finish(group, SynthesisStatus.FAILED, str(exc))
        return SynthesisStatus.FAILED
    except Exception as exc:
        # Never leave a group RUNNING: it would wait forever. Say what broke, then re-raise so
        # the worker logs the traceback.
        logger.exception("Synthesis of group %s crashed.", group_id)
        finish(group, SynthesisStatus.FAILED, f"Internal error: {type(exc).__name__}: {exc}")
        raise


def group_synthesis_fail(*, group_id: int, reason: str) -> bool:
    """The final failure (the task ran out of retries): WAITING or RUNNING → FAILED."""
    for from_status in (SynthesisStatus.WAITING, SynthesisStatus.RUNNING):
        if incident_services.group_synthesis_finish(
            group_id=group_id, status=SynthesisStatus.FAILED, error=reason, from_status=from_status
        ):
            audit_outcome(group_id, SynthesisStatus.FAILED, reason)
            return True
    return False


RETRYABLE = (
    SynthesisStatus.FAILED,
    SynthesisStatus.NO_SKILL,
    SynthesisStatus.NEEDS_SKILL,
    SynthesisStatus.BUDGET,
)


@transaction.atomic
def group_synthesis_retry(
    *, group: IncidentGroup, actor: Any, actor_label: str = ""
) -> IncidentGroup:
    """A person asks for synthesis again (after a failure, a "no skill", or once an LLM is
    configured). ``actor`` None is a machine actor whose permission the caller checked."""
    permissions.require_role(
        actor, group.project, Role.REVIEWER, message="Retrying synthesis needs the reviewer role."
    )
    locked = IncidentGroup.objects.select_for_update().get(pk=group.pk)
    if locked.synthesis_status not in RETRYABLE:
        raise Conflict(
            f"The group's synthesis is {locked.get_synthesis_status_display().lower()}; "
            "only failed, no-skill, needs-a-skill or budget groups can be retried."
        )
    before = locked.synthesis_status
    incident_services.group_request_synthesis(
        group_id=locked.pk, from_statuses=[before], reset_attempts=True
    )
    audit_record(
        action="incident_group.synthesis_retry",
        project=locked.project,
        actor=actor,
        actor_label=actor_label,
        obj=locked,
        before={"synthesis_status": before},
        after={"synthesis_status": SynthesisStatus.WAITING},
    )
    locked.refresh_from_db()
    return locked


def groups_budget_release() -> int:
    """Put BUDGET groups back in the queue for projects whose daily budget allows it again
    (a new day, or a raised budget). Called by the sweep."""
    project_ids = set(
        IncidentGroup.objects.filter(synthesis_status=SynthesisStatus.BUDGET).values_list(
            "project_id", flat=True
        )
    )
    released = 0
    for project in Project.objects.filter(pk__in=project_ids):
        if _budget_exceeded(project):
            continue
        for group_id in IncidentGroup.objects.filter(
            project=project, synthesis_status=SynthesisStatus.BUDGET
        ).values_list("id", flat=True)[:500]:
            with transaction.atomic():
                released += incident_services.group_request_synthesis(
                    group_id=group_id, from_statuses=[SynthesisStatus.BUDGET]
                )
    return released


def groups_stale_running_release(*, older_than_seconds: int) -> int:
    """RUNNING groups whose worker died (no outcome long after the claim) go back to WAITING
    for the sweep. Staleness is measured from the claim (``synthesis_claimed_at``), never from
    the request: a group that waited long before a worker claimed it is not taken from that
    worker. Groups claimed before the claim was stamped fall back to the request time."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    released = 0
    for group_id in IncidentGroup.objects.filter(
        Q(synthesis_claimed_at__lt=cutoff)
        | Q(synthesis_claimed_at__isnull=True, synthesis_requested_at__lt=cutoff),
        synthesis_status=SynthesisStatus.RUNNING,
    ).values_list("id", flat=True)[:500]:
        released += incident_services.group_synthesis_finish(
            group_id=group_id,
            status=SynthesisStatus.WAITING,
            error="The worker running this synthesis stopped; retrying.",
        )
    return released


# --- The synthesis --------------------------------------------------------------------------


def _synthesize_claimed(group: IncidentGroup) -> str:
    project = group.project
    regressed = active_revision_for_group(group)
    evidence = gather_evidence(group, regressed)
    group_vector = similar.group_vectors([(group.pk, group_text(group))])[0]
    standing = similar.latest_revisions(project)
    known = similar.similar_skills(project, standing, group_vector, regressed)
    status = _decide(group, evidence, standing, known, regressed)
    # Linking does not feed the prompt: it runs after the outcome is stored, so the reviewer's
    # wait does not include it, and a failure here costs only the links.
    try:
        similar.link_related_groups(group, group_vector)
    except DatabaseError:
        logger.warning("Could not link related groups of group %s.", group.pk, exc_info=True)
    return status


def _decide(
    group: IncidentGroup,
    evidence: Evidence,
    standing: list[similar.Standing],
    known: list[similar.KnownSkill],
    regressed: SkillRevision | None,
) -> str:
    project = group.project
    embedder = get_embedder()

    if not llm.is_configured():
        return propose_evidence_draft(group, evidence, regressed)
    if _budget_exceeded(project):
        finish(group, SynthesisStatus.BUDGET, "The project's daily LLM token budget is spent.")
        return SynthesisStatus.BUDGET

    messages = prompt_messages(group, evidence, known, regressed)
    usage = llm.Usage()
    model = ""
    proposal: Proposal | None = None
    error = ""
    for attempt in (1, 2):
        try:
            completion = llm.complete_json(messages, ANSWER_SCHEMA, schema_name="skill_synthesis")
        except llm.LlmInvalidOutput as exc:
            usage += exc.usage
            _usage_record(project, exc.usage)
            error = str(exc)
            content = exc.content
        else:
            usage += completion.usage
            model = completion.model
            _usage_record(project, completion.usage)
            content = completion.content
            try:
                proposal = validate(completion.parsed, project, known)
                break
            except InvalidAnswer as exc:
                error = str(exc)
        if attempt == 1:
            messages = [
                *messages,
                {"role": "assistant", "content": content[:4000]},
                {
                    "role": "user",
                    "content": f"Your answer was invalid: {error}\n"
                    "Answer again with one corrected JSON object only.",
                },
            ]
    if proposal is None:
        finish(group, SynthesisStatus.FAILED, f"The LLM's answer was invalid twice: {error}")
        return SynthesisStatus.FAILED

    if proposal.decision == "no_skill":
        finish(group, SynthesisStatus.NO_SKILL, f"{proposal.diagnosis} — {proposal.reason}")
        return SynthesisStatus.NO_SKILL

    vector = embedder.embed_one(
        skill_text(proposal.name, proposal.description, proposal.instructions)
    )
    note = ""
    parent = proposal.parent
    if proposal.decision == "new_skill" and parent is None:
        duplicate = similar.near_duplicate(standing, vector, proposal.slug)
        if duplicate is not None:
            standing_of, revision_of, score = duplicate
            note = (
                f"Proposed as the new skill '{proposal.slug}', but it is {score:.2f} similar to "
                f"'{standing_of.slug}', so it is offered as a revision of that skill."
            )
            proposal.slug = standing_of.slug
            proposal.category = standing_of.category
            parent = revision_of

    diagnosis = proposal.diagnosis + (f"\n\n{note}" if note else "")
    stored_vector = [round(float(x), 6) for x in vector]
    with transaction.atomic():
        revision = skill_revision_propose(
            project=project,
            draft=RevisionDraft(
                slug=proposal.slug,
                name=proposal.name,
                description=proposal.description,
                instructions=proposal.instructions,
                category=proposal.category,
                examples=proposal.examples,
                author=Author.LLM,
                origin=Origin.LIVE_LLM,
                parent=parent,
                source_groups=[group],
                source_incidents=evidence.incidents,
                diagnosis=diagnosis,
                redactions=evidence.redactions,
                llm_model=model,
                prompt_version=PROMPT_VERSION,
                tokens_in=usage.tokens_in,
                tokens_out=usage.tokens_out,
                embedding=stored_vector,
            ),
            actor_label="fast-loop",
        )
        # No proposal without the transition: if the group is no longer ours, roll it back.
        if not finish(group, SynthesisStatus.PROPOSED, "", revision=revision):
            raise SynthesisClaimLost(f"Group {group.pk} is no longer RUNNING.")
    # This process's next syntheses rank against the new revision without reading it back
    # (the vector as stored, as every other process reads it).
    similar.revision_vector_cache_put(embedder.name, revision.pk, stored_vector)
    return SynthesisStatus.PROPOSED


# --- Costs ----------------------------------------------------------------------------------


def _budget_exceeded(project: Project) -> bool:
    budget = project.llm_daily_token_budget
    if not budget:
        return False
    used = LlmUsage.objects.filter(project=project, day=timezone.localdate()).aggregate(
        total=Sum(F("tokens_in") + F("tokens_out"))
    )["total"]
    return (used or 0) >= budget


def _usage_record(project: Project, usage: llm.Usage) -> None:
    """Add one call's tokens to the project's day, committed at once when no transaction is
    open (spent tokens count even if the synthesis fails later). Concurrent workers add up
    correctly: the update adds in the database, and the first call of a day that loses the race
    to create the row updates the winner's."""
    day = timezone.localdate()
    added = {
        "calls": F("calls") + 1,
        "tokens_in": F("tokens_in") + usage.tokens_in,
        "tokens_out": F("tokens_out") + usage.tokens_out,
    }
    if LlmUsage.objects.filter(project=project, day=day).update(**added):
        return
    try:
        with transaction.atomic():
            LlmUsage.objects.create(
                project=project,
                day=day,
                calls=1,
                tokens_in=usage.tokens_in,
                tokens_out=usage.tokens_out,
            )
    except IntegrityError:
        LlmUsage.objects.filter(project=project, day=day).update(**added)
