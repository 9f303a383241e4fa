"""The fast loop's service: turn an incident group into a proposed skill revision. The
claim, the LLM exchange and the outcome share one lease and one retry policy, read best in
order, in one module.

``group_synthesize`` claims the group (one synthesis in flight per group), gathers its evidence
(the most informative incidents, redacted, trimmed to a token budget) and the most similar
existing skills, asks the LLM for a structured answer (``new_skill`` | ``revise_skill`` |
``no_skill``), validates it (one retry with the validation error), catches near-duplicates
(a "new" skill too close to an existing one becomes a revision of it), links related groups,
and stores a PROPOSED revision. The LLM is never called inside a database transaction.

Without an LLM configured the group becomes NEEDS_SKILL with a draft built from its evidence.
A project over its daily token budget leaves the group in BUDGET; the sweep puts it back in the
queue when the budget allows. Transient errors (the LLM, or the database gone mid-way) put the
group back in WAITING, due after a backoff that honours Retry-After, and raise
``SynthesisRetryLater`` for the task to retry then; once they have lasted
``METACLAW["SYNTHESIS_GIVE_UP_SECONDS"]``, or on a permanent error, the group is FAILED with the
reason (and a person can retry it). A worker renews its claim's lease while it synthesises; a
group whose lease ran out lost its worker and goes back to the queue (the sweep).
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import (
    DatabaseError,
    InterfaceError,
    OperationalError,
    transaction,
)
from django.db.models import Q
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
from skills.synthesis.budget import budget_exceeded, usage_record
from skills.synthesis.draft import propose_evidence_draft
from skills.synthesis.evidence import (
    Evidence,
    active_revision_for_group,
    gather_evidence,
    group_provenance,
    group_text,
)
from skills.synthesis.lease import lease_kept, lease_seconds
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
# Without a broker to wait on (eager tasks: tests, one-off commands) retries are immediate, and
# a transient error is final after this many claims. With one, the task backs off and the group
# fails only once it has kept failing for ``METACLAW["SYNTHESIS_GIVE_UP_SECONDS"]``.
MAX_ATTEMPTS = 5
# Backoff without a Retry-After: 5 s doubling up to this, with jitter.
RETRY_MAX_DELAY_SECONDS = 120.0


# What ``group_synthesize`` returns for a group merged into the group of its failure mode.
MERGED = "merged"


class SynthesisRetryLater(Exception):
    """A transient error: the group is WAITING again, due in ``countdown`` s; the task retries
    then, carrying ``since`` (when this series of failures began)."""

    def __init__(self, message: str, *, countdown: float = 0.0, since: float = 0.0) -> None:
        super().__init__(message)
        self.countdown = countdown
        self.since = since


def _setting(name: str, default: float) -> float:
    return float(settings.METACLAW.get(name, default))


def retry_delay(attempts: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After if it gave one (never sooner), else
    5, 10, 20... s up to ``RETRY_MAX_DELAY_SECONDS``, with jitter so groups spread out."""
    if retry_after is not None:
        return min(600.0, max(1.0, retry_after))
    delay = min(RETRY_MAX_DELAY_SECONDS, 5.0 * 2 ** max(0, attempts - 1))
    return delay * (0.85 + random.random() * 0.3)


# --- Entry points ---------------------------------------------------------------------------


def group_synthesize(
    *, group_id: int, retrying_since: float | None = None, backoff: bool = True
) -> str | None:
    """Synthesise a skill for a WAITING group that is due. Idempotent: returns None when
    another worker holds the claim or the group no longer waits (or waits for a later time);
    otherwise the group's new synthesis status.

    On a transient error (the LLM, or the database gone mid-way) raises ``SynthesisRetryLater``
    after putting the group back in WAITING, due after the backoff (``backoff=False``: at once,
    for eager tasks); ``retrying_since`` is when the failures began, carried by the task."""
    group = incident_services.group_synthesis_claim(group_id=group_id)
    if group is None:
        return None
    try:
        with lease_kept(group_id):
            # A new wording of a failure mode that has a group already joins it: one group,
            # one skill. The group it joined is asked for synthesis again if the merge brings
            # news.
            if group.events_at_synthesis == 0 and similar.merge_into_similar_group(group):
                return MERGED
            provenance = group_provenance(group)
            if provenance["sources"] < group.project.min_sources_for_synthesis:
                return _wait_for_sources(group, provenance)
            return _synthesize_claimed(group, provenance)
    except SynthesisClaimLost:
        logger.warning("Group %s was released while it was synthesised; result dropped.", group_id)
        return None
    except llm.LlmTransientError as exc:
        return _retry_later(group, str(exc), exc.retry_after, retrying_since, backoff)
    except (OperationalError, InterfaceError) as exc:
        # The database went away: not the group's fault. Marking it FAILED would fail too (or,
        # back a moment later, end it for good); it is retried like an LLM outage.
        logger.warning("Synthesis of group %s lost the database: %s", group_id, exc)
        return _retry_later(
            group, f"The database was unreachable: {exc}", None, retrying_since, backoff
        )
    except llm.LlmError as exc:
        finish(group, SynthesisStatus.FAILED, str(exc))
        return SynthesisStatus.FAILED
    except Exception as exc:
        # Never leave a group RUNNING: it would wait forever. Say what broke, then re-raise so
        # the worker logs the traceback.
        logger.exception("Synthesis of group %s crashed.", group_id)
        finish(group, SynthesisStatus.FAILED, f"Internal error: {type(exc).__name__}: {exc}")
        raise


def _retry_later(
    group: IncidentGroup,
    reason: str,
    retry_after: float | None,
    since: float | None,
    backoff: bool,
) -> str:
    now = time.time()
    since = since or now
    attempts = group.synthesis_attempts
    delay = retry_delay(attempts, retry_after) if backoff else 0.0
    give_up = _setting("SYNTHESIS_GIVE_UP_SECONDS", 900)
    if (now + delay - since > give_up) if backoff else attempts >= MAX_ATTEMPTS:
        finish(
            group,
            SynthesisStatus.FAILED,
            f"{reason} (still failing after {now - since:.0f} s and {attempts} attempts; gave up)",
        )
        return SynthesisStatus.FAILED
    due = timezone.now() + timedelta(seconds=delay)
    try:
        incident_services.group_synthesis_finish(
            group_id=group.pk,
            status=SynthesisStatus.WAITING,
            error=f"Retrying after {delay:.0f} s (attempt {attempts}): {reason}",
            requested_at=due,
        )
    except DatabaseError:
        # Still RUNNING: its lease runs out and the sweep puts it back in the queue.
        logger.warning("Could not release group %s for a retry.", group.pk, exc_info=True)
    raise SynthesisRetryLater(reason, countdown=delay, since=since)


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


def _stuck(group: IncidentGroup) -> bool:
    """No worker or queue holds it: RUNNING with a lease that ran out, or WAITING well past
    its due time (its message was lost)."""
    now = timezone.now()
    if group.synthesis_status == SynthesisStatus.RUNNING:
        claimed = group.synthesis_claimed_at or group.synthesis_requested_at
        return claimed is None or claimed < now - timedelta(seconds=lease_seconds())
    if group.synthesis_status == SynthesisStatus.WAITING:
        due = group.synthesis_requested_at
        after = settings.METACLAW["OUTBOX_SWEEP_AFTER_SECONDS"]
        return due is None or due < now - timedelta(seconds=after)
    return False


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
    if locked.synthesis_status not in RETRYABLE and not _stuck(locked):
        raise Conflict(
            f"The group's synthesis is {locked.get_synthesis_status_display().lower()}; "
            "only failed, no-skill, needs-a-skill, budget, waiting or stuck groups can be "
            "retried (a running one once its worker has stopped renewing its lease)."
        )
    before = locked.synthesis_status
    if before == SynthesisStatus.RUNNING:  # stuck: its worker is gone
        incident_services.group_synthesis_finish(
            group_id=locked.pk, status=SynthesisStatus.WAITING, error=""
        )
    incident_services.group_request_synthesis(
        group_id=locked.pk, from_statuses=[SynthesisStatus.WAITING, before], reset_attempts=True
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
        if budget_exceeded(project):
            continue
        for group_id in IncidentGroup.objects.filter(
            project=project, synthesis_status=SynthesisStatus.BUDGET
        ).values_list("id", flat=True)[:500]:
            with transaction.atomic():
                released += incident_services.group_request_synthesis(
                    group_id=group_id, from_statuses=[SynthesisStatus.BUDGET]
                )
    return released


def groups_stale_running_release(*, older_than_seconds: float) -> int:
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


def _wait_for_sources(group: IncidentGroup, provenance: dict[str, Any]) -> str:
    """Fewer distinct sources than the project's minimum: RUNNING → SOURCES, saying how many.
    The group's next incident asks again (``incidents.ingest_sql.upsert_groups``)."""
    p = provenance
    finish(
        group,
        SynthesisStatus.SOURCES,
        f"Waiting for more distinct sources: {p['sources']} of "
        f"{group.project.min_sources_for_synthesis} ({p['sessions']} session(s), "
        f"{p['end_users']} end user(s), {p['api_keys']} API key(s)). The next incident asks again.",
    )
    return SynthesisStatus.SOURCES


def _synthesize_claimed(group: IncidentGroup, provenance: dict[str, Any]) -> str:
    project = group.project
    regressed = active_revision_for_group(group)
    evidence = gather_evidence(group, regressed)
    group_vector = similar.group_vectors([(group.pk, group_text(group))])[0]
    standing = similar.latest_revisions(project)
    known = similar.similar_skills(project, standing, group_vector, regressed)
    status = _decide(group, evidence, standing, known, regressed, provenance)
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
    provenance: dict[str, Any],
) -> str:
    project = group.project
    embedder = get_embedder()

    if not llm.is_configured():
        return propose_evidence_draft(group, evidence, regressed, provenance)
    if budget_exceeded(project):
        finish(group, SynthesisStatus.BUDGET, "The project's daily LLM token budget is spent.")
        return SynthesisStatus.BUDGET

    messages = prompt_messages(group, evidence, known, regressed)
    _connection_hand_back()
    usage = llm.Usage()
    model = ""
    proposal: Proposal | None = None
    error = ""
    for attempt in (1, 2):
        try:
            completion = llm.complete_json(messages, ANSWER_SCHEMA, schema_name="skill_synthesis")
        except llm.LlmInvalidOutput as exc:
            usage += exc.usage
            usage_record(project, exc.usage)
            error = str(exc)
            content = exc.content
        else:
            usage += completion.usage
            model = completion.model
            usage_record(project, completion.usage)
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
                provenance=provenance,
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


def _connection_hand_back() -> None:
    """Before the LLM call, which takes seconds with a hosted model: give this thread's database
    connection back to the pool. A fast worker that runs many syntheses at once (``-P threads
    -c 32``, docs/deploy.md) then needs a connection for each query, not one for each synthesis
    waiting on the LLM. Only with a pool (without one, closing would cost a new connection for
    the next query) and outside a transaction (eager tasks in tests)."""
    connection = transaction.get_connection()
    if getattr(connection, "pool", None) is not None and not connection.in_atomic_block:
        connection.close()
