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

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone
from django.utils.text import slugify

from base.models import Project, Role
from base.redaction import Redactor
from base.selectors import membership_for
from base.services import Conflict, DomainError, PermissionDenied, audit_record
from base.sql import columns, placeholders
from incidents import services as incident_services
from incidents.models import GroupStatus, Incident, IncidentGroup, SynthesisStatus
from skills.library.embeddings import get_embedder, skill_text
from skills.library.models import Author, Category, Origin, RevisionStatus, Skill, SkillRevision
from skills.library.services import LIMITS, skill_content_validate, skill_revision_propose
from skills.synthesis import llm
from skills.synthesis.models import LlmUsage
from skills.versions.models import PolicyVersion, VersionStatus

logger = logging.getLogger(__name__)

PROMPT_VERSION = "synth-2026-11.1"
# Evidence sent to the LLM: at most this many incidents, about this many tokens (4 chars each).
MAX_EVIDENCE_INCIDENTS = 6
EVIDENCE_TOKEN_BUDGET = 3000
CANDIDATE_INCIDENTS = 60
MAX_SIMILAR_SKILLS = 5
MAX_RELATED_GROUPS = 10
# Claims of one group (task retries and sweeps together) before a transient error is final.
MAX_ATTEMPTS = 5


def _threshold(name: str, default: float) -> float:
    return float(getattr(settings, "METACLAW", {}).get(name, default))


def duplicate_threshold() -> float:
    """A proposed skill at least this similar (cosine) to an existing one becomes a revision."""
    return _threshold("SKILL_DUPLICATE_THRESHOLD", 0.85)


def related_threshold() -> float:
    """Groups at least this similar are linked as the same problem in other words."""
    return _threshold("GROUP_RELATED_THRESHOLD", 0.7)


class SynthesisRetryLater(Exception):
    """A transient LLM error: the group is WAITING again; retry after ``retry_after`` s."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidAnswer(Exception):
    pass


class SynthesisClaimLost(Exception):
    """The group was no longer RUNNING when this worker came to record its outcome (a sweep
    released it, another worker has it): the outcome is rolled back and nothing is recorded."""


# --- Entry points ---------------------------------------------------------------------------


def group_synthesize(*, group_id: int) -> str | None:
    """Synthesise a skill for a WAITING group. Idempotent: returns None when another worker
    holds the claim or the group no longer waits; otherwise the group's new synthesis status.

    Raises ``SynthesisRetryLater`` after releasing the group on a transient LLM error."""
    group = incident_services.group_synthesis_claim(group_id=group_id)
    if group is None:
        return None
    try:
        return _synthesize_claimed(group)
    except SynthesisClaimLost:
        logger.warning("Group %s was released while it was synthesised; result dropped.", group_id)
        return None
    except llm.LlmTransientError as exc:
        if group.synthesis_attempts >= MAX_ATTEMPTS:
            _finish(group, SynthesisStatus.FAILED, f"{exc} (gave up after {MAX_ATTEMPTS} attempts)")
            return SynthesisStatus.FAILED
        incident_services.group_synthesis_finish(
            group_id=group.pk, status=SynthesisStatus.WAITING, error=f"Retrying: {exc}"
        )
        raise SynthesisRetryLater(str(exc), retry_after=exc.retry_after) from exc
    except llm.LlmError as exc:
        _finish(group, SynthesisStatus.FAILED, str(exc))
        return SynthesisStatus.FAILED
    except Exception as exc:
        # Never leave a group RUNNING: it would wait forever. Say what broke, then re-raise so
        # the worker logs the traceback.
        logger.exception("Synthesis of group %s crashed.", group_id)
        _finish(group, SynthesisStatus.FAILED, f"Internal error: {type(exc).__name__}: {exc}")
        raise


def group_synthesis_fail(*, group_id: int, reason: str) -> bool:
    """The final failure (the task ran out of retries): WAITING or RUNNING → FAILED."""
    for from_status in (SynthesisStatus.WAITING, SynthesisStatus.RUNNING):
        if incident_services.group_synthesis_finish(
            group_id=group_id, status=SynthesisStatus.FAILED, error=reason, from_status=from_status
        ):
            _audit_outcome(group_id, SynthesisStatus.FAILED, reason)
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
    if actor is not None:
        membership = membership_for(user=actor, project=group.project)
        if membership is None or not membership.has_role(Role.REVIEWER):
            raise PermissionDenied("Retrying synthesis needs the reviewer role.")
    locked = IncidentGroup.objects.select_for_update().get(pk=group.pk)
    if locked.synthesis_status not in RETRYABLE:
        raise Conflict(
            f"The group's synthesis is {locked.get_synthesis_status_display().lower()}; "
            "only failed, no-skill, needs-a-skill or budget groups can be retried."
        )
    before = locked.synthesis_status
    incident_services.group_request_synthesis(group_id=locked.pk, from_statuses=[before])
    # A person's retry starts a fresh series of attempts (the transient-error limit counts
    # claims since the last request).
    IncidentGroup.objects.filter(pk=locked.pk).update(synthesis_attempts=0)
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


# --- Regressions ----------------------------------------------------------------------------


def skill_regressions_detect(
    *, project: Project, group_ids: list[int], incident_ids: list[Any]
) -> list[int]:
    """New incidents in groups whose skill is in the ACTIVE policy: the skill did not work.
    Marks those groups regressed and asks for a revision of the skill (unless one is pending
    already: then the incidents are just more evidence). Runs inside the ingest transaction.
    Returns the regressed group ids."""
    # This runs on every ingest, so it is split into small single-table reads: a five-table
    # join here cost ~3 ms of PostgreSQL planning per request, more than the ingest itself.
    through = SkillRevision.source_groups.through._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT skillrevision_id, incidentgroup_id FROM {through} "
            f"WHERE incidentgroup_id IN ({placeholders(group_ids)})",
            list(group_ids),
        )
        sources = cursor.fetchall()
        if not sources:
            return []
        # Written out, like the read above: once a group has a proposal, every incident of
        # it comes here, and the ORM's compiling of this join cost more than PostgreSQL's run.
        revision_ids = sorted({revision_id for revision_id, _ in sources})
        cursor.execute(
            f"SELECT pr.skillrevision_id FROM {PolicyVersion.revisions.through._meta.db_table} pr "
            f"JOIN {PolicyVersion._meta.db_table} v ON v.id = pr.policyversion_id "
            f"WHERE v.project_id = %s AND v.status = %s "
            f"AND pr.skillrevision_id IN ({placeholders(revision_ids)})",
            [project.pk, VersionStatus.ACTIVE.value, *revision_ids],
        )
        active = {row[0] for row in cursor.fetchall()}
    if not active:
        return []
    details = {
        row[0]: row
        for row in SkillRevision.objects.filter(pk__in=active).values_list(
            "id", "skill_id", "skill__slug", "status_changed_at"
        )
    }
    hits = [
        (*details[revision_id], group_id)
        for revision_id, group_id in sources
        if revision_id in details
    ]
    regressed: list[int] = []
    for revision_id, skill_id, slug, approved_at, group_id in hits:
        if group_id not in group_ids:
            continue
        numbers = set(
            PolicyVersion.objects.filter(project=project, revisions=revision_id).values_list(
                "number", flat=True
            )
        )
        ran_with_skill = Incident.objects.filter(
            project=project, pk__in=incident_ids, group_id=group_id
        ).filter(
            Q(policy_version__in=numbers)
            | Q(policy_version__isnull=True, occurred_at__gte=approved_at or timezone.now())
        )
        if not ran_with_skill.exists():
            continue
        incident_services.group_mark_regressed(
            group_id=group_id,
            reason=f"A new incident arrived although the skill '{slug}' is in the active policy.",
        )
        regressed.append(group_id)
        pending = SkillRevision.objects.filter(
            skill_id=skill_id,
            status=RevisionStatus.PROPOSED,
            created_at__gt=approved_at or timezone.now(),
        )
        if not pending.exists():
            incident_services.group_request_synthesis(
                group_id=group_id,
                from_statuses=[
                    SynthesisStatus.NONE,
                    SynthesisStatus.PROPOSED,
                    SynthesisStatus.NO_SKILL,
                    SynthesisStatus.NEEDS_SKILL,
                    SynthesisStatus.FAILED,
                ],
            )
    return regressed


# --- The synthesis --------------------------------------------------------------------------


@dataclass
class Evidence:
    incidents: list[Incident]
    text: str
    redactions: list[dict[str, Any]]
    tokens: int


@dataclass
class KnownSkill:
    skill_id: int
    slug: str
    revision: SkillRevision
    score: float
    active: bool = False
    rolled_back: list[SkillRevision] = field(default_factory=list)


@dataclass
class Proposal:
    decision: str
    diagnosis: str
    reason: str = ""
    slug: str = ""
    name: str = ""
    description: str = ""
    instructions: str = ""
    category: str = Category.GENERAL
    examples: list[str] = field(default_factory=list)
    # The revision this one derives from (the skill's approved one, else its newest).
    parent: SkillRevision | None = None


def _synthesize_claimed(group: IncidentGroup) -> str:
    project = group.project
    regressed = _active_revision_for_group(group)
    evidence = _gather_evidence(group, regressed)
    group_vector = _group_vectors([(group.pk, _group_text(group))])[0]
    standing = _latest_revisions(project)
    known = _similar_skills(project, standing, group_vector, regressed)
    status = _decide(group, evidence, standing, known, regressed)
    # Linking does not feed the prompt: it runs after the outcome is stored, so the reviewer's
    # wait does not include it, and a failure here costs only the links.
    try:
        _link_related_groups(group, group_vector)
    except DatabaseError:
        logger.warning("Could not link related groups of group %s.", group.pk, exc_info=True)
    return status


def _decide(
    group: IncidentGroup,
    evidence: Evidence,
    standing: list[Standing],
    known: list[KnownSkill],
    regressed: SkillRevision | None,
) -> str:
    project = group.project
    embedder = get_embedder()

    if not llm.is_configured():
        return _propose_evidence_draft(group, evidence, regressed)
    if _budget_exceeded(project):
        _finish(group, SynthesisStatus.BUDGET, "The project's daily LLM token budget is spent.")
        return SynthesisStatus.BUDGET

    messages = _prompt(group, evidence, known, regressed)
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
                proposal = _validate(completion.parsed, project, known)
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
        _finish(group, SynthesisStatus.FAILED, f"The LLM's answer was invalid twice: {error}")
        return SynthesisStatus.FAILED

    if proposal.decision == "no_skill":
        _finish(group, SynthesisStatus.NO_SKILL, f"{proposal.diagnosis} — {proposal.reason}")
        return SynthesisStatus.NO_SKILL

    vector = embedder.embed_one(
        skill_text(proposal.name, proposal.description, proposal.instructions)
    )
    note = ""
    parent = proposal.parent
    if proposal.decision == "new_skill" and parent is None:
        duplicate = _near_duplicate(standing, vector, proposal.slug)
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
            actor_label="fast-loop",
        )
        # No proposal without the transition: if the group is no longer ours, roll it back.
        if not _finish(group, SynthesisStatus.PROPOSED, "", revision=revision):
            raise SynthesisClaimLost(f"Group {group.pk} is no longer RUNNING.")
    # This process's next syntheses rank against the new revision without reading it back
    # (the vector as stored, as every other process reads it).
    _revision_vector_cache_put(embedder.name, revision.pk, stored_vector)
    return SynthesisStatus.PROPOSED


def _finish(
    group: IncidentGroup, status: str, reason: str, *, revision: SkillRevision | None = None
) -> bool:
    """Record the outcome (RUNNING → ``status``); False when the group was no longer RUNNING."""
    if incident_services.group_synthesis_finish(group_id=group.pk, status=status, error=reason):
        _audit_outcome(group.pk, status, reason, revision=revision, project=group.project)
        return True
    return False


def _audit_outcome(
    group_id: int,
    status: str,
    reason: str,
    *,
    revision: SkillRevision | None = None,
    project: Project | None = None,
) -> None:
    group = IncidentGroup(pk=group_id)
    if project is None:
        project = Project.objects.filter(incident_groups__pk=group_id).first()
    after: dict[str, Any] = {"synthesis_status": status}
    if revision is not None:
        after["revision_id"] = revision.pk
    audit_record(
        action=f"incident_group.synthesis_{status}",
        project=project,
        actor_label="fast-loop",
        obj=group,
        after=after,
        message=reason[:2000],
    )


# --- Evidence -------------------------------------------------------------------------------


def _active_revision_for_group(group: IncidentGroup) -> SkillRevision | None:
    """The group's skill revision in the active policy, if a new incident came after it
    went live: the synthesis is then a revision of that skill."""
    if group.status != GroupStatus.REGRESSED:
        return None  # the regression receiver marks the group before asking for a revision
    revision = (
        SkillRevision.objects.filter(
            source_groups=group,
            policy_versions__project=group.project,
            policy_versions__status=VersionStatus.ACTIVE,
        )
        .select_related("skill")
        .order_by("-created_at")
        .first()
    )
    if revision is None:
        return None
    since = revision.status_changed_at or revision.created_at
    if not group.incidents.filter(received_at__gte=since).exists():
        return None
    return revision


def _informativeness(incident: Incident) -> float:
    score = 0.0
    if incident.feedback_text:
        score += 3
    if incident.feedback_score is not None or incident.reward is not None:
        score += 1
    if any(m.get("tool_calls") for m in incident.messages if isinstance(m, dict)):
        score += 2
    if incident.error_message:
        score += 1 + min(len(incident.error_message), 400) / 400
    score += min(len(incident.messages), 8) / 8
    return score


def _gather_evidence(group: IncidentGroup, regressed: SkillRevision | None) -> Evidence:
    candidates = list(
        Incident.objects.raw(
            f"SELECT {columns(Incident)} FROM {Incident._meta.db_table} WHERE group_id = %s "
            "ORDER BY occurred_at DESC LIMIT %s",
            [group.pk, CANDIDATE_INCIDENTS],
        )
    )
    since = None
    if regressed is not None:
        since = regressed.status_changed_at or regressed.created_at
    seen: set[str] = set()
    ranked: list[tuple[float, int, Incident]] = []
    for position, incident in enumerate(candidates):
        # Different wording carries more information than the same failure twice.
        key = f"{incident.error_message[:200]}|{incident.feedback_text[:200]}"
        score = _informativeness(incident) - (2.5 if key in seen else 0)
        seen.add(key)
        if since is not None and incident.received_at >= since:
            score += 5  # evidence that the active skill did not work comes first
        ranked.append((score, -position, incident))
    ranked.sort(key=lambda item: (item[0], item[1]), reverse=True)

    redactor = Redactor()
    budget_chars = EVIDENCE_TOKEN_BUDGET * 4
    parts: list[str] = []
    chosen: list[Incident] = []
    used = 0
    for _, _, incident in ranked[:MAX_EVIDENCE_INCIDENTS]:
        block = _render_incident(len(chosen) + 1, incident, redactor, since)
        if chosen and used + len(block) > budget_chars:
            continue
        if len(block) > budget_chars - used:
            block = block[: max(400, budget_chars - used)] + "\n[…trimmed]"
        parts.append(block)
        chosen.append(incident)
        used += len(block)
    text = "\n\n".join(parts)
    return Evidence(
        incidents=chosen, text=text, redactions=redactor.report(), tokens=len(text) // 4
    )


def _clip(text: str, limit: int) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _render_message(message: dict[str, Any], redactor: Redactor) -> list[str]:
    role = str(message.get("role", "?"))
    lines: list[str] = []
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text")
        )
    label = role
    if role == "tool":
        label = f"tool {message.get('name') or message.get('tool_call_id') or ''}".strip()
    if content:
        limit = 300 if role == "system" else 600
        lines.append(f"[{label}] {redactor.text(_clip(str(content), limit))}")
    for call in message.get("tool_calls") or []:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        args = redactor.text(_clip(str(function.get("arguments", "")), 400))
        lines.append(f"[{role} → tool call] {function.get('name', '?')}({args})")
    return lines


def _render_incident(number: int, incident: Incident, redactor: Redactor, since: Any | None) -> str:
    head = (
        f"### Incident {number} ({incident.kind}, severity {incident.severity}, agent "
        f"{incident.agent_name} {incident.agent_version}".rstrip()
        + (f", policy v{incident.policy_version}" if incident.policy_version else "")
        + ")"
    )
    if since is not None and incident.received_at >= since:
        head += " — happened while the skill was active"
    lines = [head]
    if incident.error_type or incident.error_message:
        error = f"{incident.error_type}: {incident.error_message}".strip(": ")
        lines.append("Error: " + redactor.text(_clip(error, 800)))
    if incident.tool_name:
        lines.append(f"Tool: {incident.tool_name}")
    messages = [m for m in incident.messages if isinstance(m, dict)]
    if len(messages) > 10:
        omitted = len(messages) - 9
        messages = (
            messages[:1]
            + [{"role": "note", "content": f"{omitted} earlier messages"}]
            + (messages[-8:])
        )
    if messages:
        lines.append("Conversation:")
        for message in messages:
            lines.extend(_render_message(message, redactor))
    feedback = []
    if incident.feedback_text:
        feedback.append(f'"{redactor.text(_clip(incident.feedback_text, 500))}"')
    if incident.feedback_score is not None:
        feedback.append(f"score {incident.feedback_score:g}")
    if incident.reward is not None:
        feedback.append(f"reward {incident.reward:g}")
    if feedback:
        lines.append("Feedback: " + ", ".join(feedback))
    if incident.metadata:
        metadata = json.dumps(redactor.json(incident.metadata), ensure_ascii=False)
        lines.append("Metadata: " + _clip(metadata, 400))
    return "\n".join(lines)


def _group_text(group: IncidentGroup) -> str:
    return _group_text_of(group.title, group.tool_name)


def _group_text_of(title: str, tool_name: str) -> str:
    if tool_name and tool_name not in title:
        return f"{title} tool {tool_name}"
    return title


# --- Similar skills and groups --------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """The revision that stands for a skill now (its newest approved or proposed one), in the
    few columns ranking needs; full rows are loaded only for the top matches."""

    revision_id: int
    skill_id: int
    slug: str
    category: str


# The reads below run in every synthesis, so they are written out: the ORM spent more CPU
# compiling each of them than PostgreSQL spent running it (the fast loop's throughput under a
# burst of new groups is CPU-bound). Table names come from the models; the SQL is portable.
REVISIONS = SkillRevision._meta.db_table
SKILLS = Skill._meta.db_table


def _latest_revisions(project: Project) -> list[Standing]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT r.id, r.skill_id, s.slug, s.category FROM {REVISIONS} r "
            f"JOIN {SKILLS} s ON s.id = r.skill_id "
            "WHERE s.project_id = %s AND r.status IN (%s, %s) "
            "ORDER BY r.skill_id, r.number DESC LIMIT 5000",
            [project.pk, RevisionStatus.APPROVED.value, RevisionStatus.PROPOSED.value],
        )
        rows = cursor.fetchall()
    latest: dict[int, Standing] = {}
    for revision_id, skill_id, slug, category in rows:
        if skill_id not in latest:
            latest[skill_id] = Standing(revision_id, skill_id, slug, category)
    return list(latest.values())


# Revisions are immutable, so their vectors can be kept for the life of the worker process.
_revision_vector_cache: dict[tuple[str, int], np.ndarray] = {}
_group_vector_cache: dict[tuple[str, int, str], np.ndarray] = {}
_CACHE_LIMIT = 50_000


def _revision_vector_cache_put(embedder_name: str, revision_id: int, vector: list[float]) -> None:
    if len(_revision_vector_cache) > _CACHE_LIMIT:
        _revision_vector_cache.clear()
    _revision_vector_cache[(embedder_name, revision_id)] = np.asarray(vector, dtype=np.float32)


def _revision_vectors(revision_ids: list[int]) -> np.ndarray:
    embedder = get_embedder()
    missing = [pk for pk in revision_ids if (embedder.name, pk) not in _revision_vector_cache]
    if missing:
        if len(_revision_vector_cache) > _CACHE_LIMIT:
            _revision_vector_cache.clear()
        to_embed: list[tuple[int, str]] = []
        for pk, vector, name, description, instructions in SkillRevision.objects.filter(
            pk__in=missing
        ).values_list("id", "embedding", "name", "description", "instructions"):
            if vector and len(vector) == embedder.dim:
                _revision_vector_cache[(embedder.name, pk)] = np.asarray(vector, dtype=np.float32)
            else:
                to_embed.append((pk, skill_text(name, description, instructions)))
        if to_embed:
            vectors = embedder.embed([text for _, text in to_embed])
            for (pk, _), vector in zip(to_embed, vectors, strict=True):
                _revision_vector_cache[(embedder.name, pk)] = vector
    if not revision_ids:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack([_revision_vector_cache[(embedder.name, pk)] for pk in revision_ids])


def _group_vectors(groups: list[tuple[int, str]]) -> np.ndarray:
    """Vectors of ``(group id, group text)`` pairs, cached per process."""
    embedder = get_embedder()
    keys = [(embedder.name, pk, text) for pk, text in groups]
    missing = [i for i, key in enumerate(keys) if key not in _group_vector_cache]
    if missing:
        if len(_group_vector_cache) > _CACHE_LIMIT:
            _group_vector_cache.clear()
        for i, vector in zip(missing, embedder.embed([keys[i][2] for i in missing]), strict=True):
            _group_vector_cache[keys[i]] = vector
    if not keys:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    return np.stack([_group_vector_cache[key] for key in keys])


def _similar_skills(
    project: Project,
    standing: list[Standing],
    group_vector: np.ndarray,
    regressed: SkillRevision | None,
) -> list[KnownSkill]:
    candidates = list(standing)
    if regressed is not None and all(c.skill_id != regressed.skill_id for c in candidates):
        candidates.append(
            Standing(
                regressed.pk, regressed.skill_id, regressed.skill.slug, regressed.skill.category
            )
        )
    if not candidates:
        return []
    scores = _revision_vectors([c.revision_id for c in candidates]) @ group_vector
    order = [int(i) for i in np.argsort(-scores)[:MAX_SIMILAR_SKILLS]]
    if regressed is not None:
        index = next(i for i, c in enumerate(candidates) if c.skill_id == regressed.skill_id)
        order = [index] + [i for i in order if i != index][: MAX_SIMILAR_SKILLS - 1]
    top_ids = [candidates[i].revision_id for i in order]
    top_skill_ids = [candidates[i].skill_id for i in order]
    # One query for the top matches (is each in the active policy?) and the rolled-back
    # revisions of their skills: the prompt shows both.
    rows = list(
        SkillRevision.objects.raw(
            "SELECT r.id, r.skill_id, r.number, r.name, r.description, r.instructions, "
            "r.status, r.rolled_back_at, EXISTS (SELECT 1 FROM "
            f"{PolicyVersion.revisions.through._meta.db_table} pr "
            f"JOIN {PolicyVersion._meta.db_table} v ON v.id = pr.policyversion_id "
            "WHERE pr.skillrevision_id = r.id AND v.project_id = %s AND v.status = %s"
            f") AS in_active_policy FROM {REVISIONS} r WHERE r.id IN ({placeholders(top_ids)}) "
            f"OR (r.skill_id IN ({placeholders(top_skill_ids)}) AND r.rolled_back_at IS NOT NULL)",
            [project.pk, VersionStatus.ACTIVE.value, *top_ids, *top_skill_ids],
        )
    )
    by_id = {row.pk: row for row in rows}
    known = [
        KnownSkill(
            skill_id=candidates[i].skill_id,
            slug=candidates[i].slug,
            revision=by_id[candidates[i].revision_id],
            score=float(scores[i]),
            active=bool(by_id[candidates[i].revision_id].in_active_policy),
        )
        for i in order
        if candidates[i].revision_id in by_id
    ]
    rolled_back = sorted(
        (row for row in rows if row.rolled_back_at is not None),
        key=lambda row: row.rolled_back_at,
        reverse=True,
    )
    for revision in rolled_back:
        for item in known:
            if item.skill_id == revision.skill_id:
                item.rolled_back.append(revision)
    return known


def _link_related_groups(group: IncidentGroup, vector: np.ndarray) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, title, tool_name FROM {IncidentGroup._meta.db_table} "
            "WHERE project_id = %s AND id <> %s ORDER BY last_seen DESC LIMIT 500",
            [group.project_id, group.pk],
        )
        others = [(pk, _group_text_of(title, tool)) for pk, title, tool in cursor.fetchall()]
    if not others:
        return
    scores = _group_vectors(others) @ vector
    threshold = related_threshold()
    related = [
        others[i][0]
        for i in np.argsort(-scores)[:MAX_RELATED_GROUPS]
        if float(scores[i]) >= threshold
    ]
    if not related:
        return
    # Both directions in one statement, in a fixed order: two workers linking the same pair
    # from either end would otherwise take the index locks in opposite orders and deadlock.
    # One autocommitted statement (bulk_create would wrap it in a transaction of its own).
    table = IncidentGroup.related_groups.through._meta.db_table
    pairs = sorted({(group.pk, other) for other in related} | {(o, group.pk) for o in related})
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (from_incidentgroup_id, to_incidentgroup_id) VALUES "
            + ", ".join(["(%s, %s)"] * len(pairs))
            + " ON CONFLICT DO NOTHING",
            [pk for pair in pairs for pk in pair],
        )


def _near_duplicate(
    standing: list[Standing], vector: np.ndarray, slug: str
) -> tuple[Standing, SkillRevision, float] | None:
    candidates = [c for c in standing if c.slug != slug]
    if not candidates:
        return None
    scores = _revision_vectors([c.revision_id for c in candidates]) @ vector
    best = int(np.argmax(scores))
    if float(scores[best]) < duplicate_threshold():
        return None
    revision = next(
        iter(
            SkillRevision.objects.raw(
                f"SELECT {columns(SkillRevision)} FROM {REVISIONS} WHERE id = %s",
                [candidates[best].revision_id],
            )
        ),
        None,
    )
    return (candidates[best], revision, float(scores[best])) if revision is not None else None


# --- Prompt and answer ----------------------------------------------------------------------

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "diagnosis": {
            "type": "string",
            "description": "The root cause in one or two sentences, for the human reviewer.",
        },
        "decision": {"type": "string", "enum": ["new_skill", "revise_skill", "no_skill"]},
        "reason": {
            "type": "string",
            "description": "For no_skill: why no instruction to the agent can prevent this.",
        },
        "skill": {
            "type": ["object", "null"],
            "properties": {
                "slug": {"type": "string"},
                "name": {"type": "string"},
                "description": {"type": "string"},
                "instructions": {"type": "string"},
                "category": {"type": "string", "enum": list(Category.values)},
                "examples": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["slug", "name", "description", "instructions", "category"],
        },
    },
    "required": ["diagnosis", "decision"],
}

SYSTEM_PROMPT = f"""You improve an LLM agent in production by writing skills: short, reusable \
instructions injected into the agent's system prompt so that a failure does not happen again.

You get the evidence of one group of similar failures (redacted: [REDACTED:kind] marks removed \
secrets and personal data) and the existing skills most similar to it. Answer with ONE JSON \
object, no prose:
{{"diagnosis": "...", "decision": "new_skill" | "revise_skill" | "no_skill", \
"reason": "...", "skill": {{"slug": "...", "name": "...", "description": "...", \
"instructions": "...", "category": "...", "examples": ["..."]}}}}

- diagnosis: the root cause in one or two plain sentences, for the person who reviews the skill.
- new_skill: no existing skill covers this. revise_skill: an existing skill covers it but did not \
prevent it; give that skill's slug and its complete new text. no_skill: no instruction to the \
agent can prevent it (an infrastructure outage, a bug in a tool); give the reason; skill null.
- slug: lowercase words joined by hyphens, at most {LIMITS["slug"]} characters, e.g. \
"iso-dates-for-order-search". name: a few words. description: one sentence saying WHEN to use \
the skill (at most {LIMITS["description"]} characters). instructions: Markdown, imperative, \
specific (what to do, what never to do), no more than about 200 words; never include secrets, \
personal data or one customer's details. category: one of {", ".join(Category.values)}.
- Never propose again, unchanged, a skill text marked as rolled back."""


def _describe_skill(item: KnownSkill) -> str:
    revision = item.revision
    state = "in the active policy" if item.active else revision.status
    lines = [
        f"- slug `{item.slug}` (r{revision.number}, {state}, similarity {item.score:.2f}): "
        f"{revision.name}. {revision.description}",
        "  Instructions: " + _clip(revision.instructions, 700).replace("\n", "\n  "),
    ]
    for old in item.rolled_back[:2]:
        lines.append(
            f"  Rolled back on {old.rolled_back_at:%Y-%m-%d} (do not propose again unchanged): "
            + _clip(old.instructions, 300).replace("\n", " ")
        )
    return "\n".join(lines)


def _prompt(
    group: IncidentGroup,
    evidence: Evidence,
    known: list[KnownSkill],
    regressed: SkillRevision | None,
) -> list[dict[str, str]]:
    header = [
        f"Incident group: {group.title}",
        f"Agent: {group.agent_name}; kind: {group.kind}; "
        f"{group.event_count} occurrence(s) since {group.first_seen:%Y-%m-%d}.",
    ]
    if regressed is not None:
        header.append(
            f"IMPORTANT: the skill `{regressed.skill.slug}` (r{regressed.number}) is in the "
            "active policy and was written for this failure, yet it happened again (the "
            "incidents marked below). Revise that skill (revise_skill) so it would have "
            "prevented them, or answer no_skill if no instruction can."
        )
    skills = "\n".join(_describe_skill(k) for k in known) or "(none yet)"
    user = (
        "\n".join(header)
        + f"\n\n## Evidence ({len(evidence.incidents)} incident(s))\n\n{evidence.text}"
        + f"\n\n## Existing skills most similar to this failure\n\n{skills}"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _validate(parsed: dict[str, Any], project: Project, known: list[KnownSkill]) -> Proposal:
    """Check the LLM's answer; ``InvalidAnswer`` says what to fix (sent back to the LLM)."""
    decision = _text(parsed.get("decision"))
    diagnosis = _text(parsed.get("diagnosis"))
    if decision not in ("new_skill", "revise_skill", "no_skill"):
        raise InvalidAnswer(
            f"'decision' must be new_skill, revise_skill or no_skill, not {decision!r}."
        )
    if not diagnosis:
        raise InvalidAnswer("'diagnosis' must state the root cause in one or two sentences.")
    if len(diagnosis) > 1000:
        raise InvalidAnswer("'diagnosis' must be at most 1000 characters.")
    if decision == "no_skill":
        reason = _text(parsed.get("reason"))
        if not reason:
            raise InvalidAnswer("'reason' must say why no skill can help (decision no_skill).")
        return Proposal(decision=decision, diagnosis=diagnosis, reason=_clip(reason, 1000))
    skill = parsed.get("skill")
    if not isinstance(skill, dict):
        raise InvalidAnswer(f"'skill' must be an object for decision {decision}.")
    examples = skill.get("examples") or []
    if not isinstance(examples, list):
        examples = [examples]
    proposal = Proposal(
        decision=decision,
        diagnosis=diagnosis,
        slug=_text(skill.get("slug")),
        name=_text(skill.get("name")),
        description=_text(skill.get("description")),
        instructions=_text(skill.get("instructions")),
        category=_text(skill.get("category")) or Category.GENERAL,
        examples=[_clip(str(e), 1000) for e in examples[:5] if str(e).strip()],
    )
    try:
        skill_content_validate(
            slug=proposal.slug,
            name=proposal.name,
            description=proposal.description,
            instructions=proposal.instructions,
            category=proposal.category,
        )
    except DomainError as exc:
        raise InvalidAnswer(f"skill.{exc.field}: {exc}") from exc
    # One query for everything this slug already has, in the columns the checks read (a skill
    # can hold many revisions).
    history = list(
        SkillRevision.objects.raw(
            "SELECT r.id, r.skill_id, r.number, r.status, r.instructions, r.rolled_back_at "
            f"FROM {REVISIONS} r JOIN {SKILLS} s ON s.id = r.skill_id "
            "WHERE s.project_id = %s AND s.slug = %s ORDER BY r.number DESC",
            [project.pk, proposal.slug],
        )
    )
    if decision == "revise_skill" and not history:
        slugs = ", ".join(k.slug for k in known) or "none"
        raise InvalidAnswer(
            f"revise_skill names '{proposal.slug}', which is not an existing skill "
            f"(existing: {slugs}); use new_skill for a new one."
        )
    for old in history:
        if old.rolled_back_at and _normalized(old.instructions) == _normalized(
            proposal.instructions
        ):
            raise InvalidAnswer(
                f"These instructions are r{old.number} of '{proposal.slug}', which was rolled "
                f"back on {old.rolled_back_at:%Y-%m-%d}; propose a different fix or no_skill."
            )
    approved = [r for r in history if r.status == RevisionStatus.APPROVED]
    current = approved[0] if approved else (history[0] if history else None)
    if current is not None and _normalized(current.instructions) == _normalized(
        proposal.instructions
    ):
        raise InvalidAnswer(
            f"The instructions for '{proposal.slug}' are unchanged from r{current.number}; "
            "a revision must change what the agent does."
        )
    proposal.parent = current
    return proposal


# --- Without an LLM -------------------------------------------------------------------------


def _propose_evidence_draft(
    group: IncidentGroup, evidence: Evidence, regressed: SkillRevision | None
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
        _finish(group, status, "", revision=existing)
        return status
    redactor = Redactor()
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
    bullets = [f"- {redactor.text(_clip(group.title, 300))} ({group.event_count} event(s))"]
    if group.tool_name:
        bullets.append(f"- Tool: `{group.tool_name}`")
    if first is not None and first.error_message:
        bullets.append(f"- Error: {redactor.text(_clip(first.error_message, 400))}")
    bullets += [f'- User feedback: "{redactor.text(_clip(text, 300))}"' for text in feedback]
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
            slug=slug,
            name=_clip(f"Avoid: {redactor.text(group.title)}", LIMITS["name"]),
            description=_clip(
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
            prompt_version="",
            actor_label="fast-loop",
        )
        if not _finish(
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
    """Add one call's tokens to the project's day, in one statement committed at once (spent
    tokens count even if the synthesis fails later; concurrent workers add up correctly)."""
    table = LlmUsage._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} (project_id, day, calls, tokens_in, tokens_out)
            VALUES (%s, %s, 1, %s, %s)
            ON CONFLICT (project_id, day) DO UPDATE SET
                calls = {table}.calls + 1,
                tokens_in = {table}.tokens_in + EXCLUDED.tokens_in,
                tokens_out = {table}.tokens_out + EXCLUDED.tokens_out
            """,
            [
                project.pk,
                connection.ops.adapt_datefield_value(timezone.localdate()),
                usage.tokens_in,
                usage.tokens_out,
            ],
        )
