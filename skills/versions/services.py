"""Reviews and versions' writes: every decision that changes what agents run with. Approving
or rejecting a revision, a reviewer's edit, candidate versions (from the slow loop), promotion,
rejection and rollback, and a new project's first version. The dashboard, the API, approval
links and Celery tasks all call these.

One module on purpose (past 500 lines): every decision takes the same locks in the same order
(the project, then the version or revision) and ends the same way (status, audit event,
announcement after commit); split, that lock order would live in several places.

What the statuses promise, kept by ``_activate`` on every change of the active version: a
revision reads APPROVED exactly while the active version holds it (after a rollback, the one that
is live again); one that left it reads SUPERSEDED, and with ``rolled_back_at`` set when a rollback
took it out. Synthesis, the exports and the API read these."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from base import permissions
from base.errors import Conflict, DomainError, NotFound
from base.models import ApiKey, Project, Role
from base.services import audit_record
from skills import signals
from skills.library import judge, risk
from skills.library.models import Author, Origin, RevisionStatus, SkillRevision
from skills.library.services import RevisionDraft, skill_revision_propose
from skills.versions.models import PolicyVersion, Release, ReleaseKind, VersionStatus


@transaction.atomic
def policy_version_create_initial(*, project: Project) -> PolicyVersion:
    """Version 1 of a new project: no skills, active. Idempotent."""
    existing = PolicyVersion.objects.filter(project=project, number=1).first()
    if existing is not None:
        return existing
    version = PolicyVersion.objects.create(
        project=project,
        number=1,
        status=VersionStatus.ACTIVE,
        status_changed_at=timezone.now(),
        changelog="Initial policy: no skills yet.",
    )
    Release.objects.create(
        project=project, kind=ReleaseKind.INITIAL, to_version=version, actor_label="system"
    )
    audit_record(action="policy_version.create", project=project, obj=version, after={"number": 1})
    return version


# --- Decisions: approve, reject, edit, promote, reject, roll back ------------------------------
#
# Lock order, everywhere below: the project row first, then the version / revision rows. The
# project lock serialises every decision that can change the active version of one project, so
# version numbers never collide and two versions are never active (the partial unique index
# ``version_one_active`` is the last line of defence, not the mechanism).

FIRST_APPROVAL_ACTION = "skill_revision.approve_first"


def _lock_project(project_id: int) -> Project:
    return Project.objects.select_for_update().get(pk=project_id)


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "an unknown time"


def _revision_decided_message(revision: SkillRevision) -> str:
    """The "already approved by X at T" message; for a superseded revision, also the newest
    revision of the skill (what a reviewer should look at instead)."""
    who = revision.decided_by_label or "someone"
    message = (
        f"{revision.skill.slug} r{revision.number} was already {revision.status} by {who} "
        f"at {_when(revision.status_changed_at)}."
    )
    if revision.status == RevisionStatus.SUPERSEDED:
        if revision.rolled_back_at:
            message += f" It was rolled back at {_when(revision.rolled_back_at)}."
        newest = (
            SkillRevision.objects.filter(skill_id=revision.skill_id, number__gt=revision.number)
            .order_by("-number")
            .only("number", "status")
            .first()
        )
        if newest is not None:
            message += f" The newest revision is r{newest.number} ({newest.status})."
    return message


def _how_active(version: PolicyVersion) -> str:
    """How the active ``version`` became active: "promotion by X at T"."""
    release = Release.objects.filter(to_version=version).order_by("-created_at", "-id").first()
    if release is None:
        return f"active since {_when(version.status_changed_at)}"
    return (
        f"{release.get_kind_display().lower()} by {release.actor_label or 'someone'} at "
        f"{_when(release.created_at)}"
    )


def _version_decided_message(version: PolicyVersion) -> str:
    if version.status == VersionStatus.ACTIVE:
        return f"v{version.number} is already active ({_how_active(version)})."
    return f"v{version.number} is {version.status} (since {_when(version.status_changed_at)})."


def _reason_required(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise DomainError("Give a reason.", field="reason")
    return reason


def _next_version_number(project: Project) -> int:
    """Must run under the project lock."""
    return (PolicyVersion.objects.filter(project=project).aggregate(n=Max("number"))["n"] or 0) + 1


def _active_version(project: Project) -> PolicyVersion:
    """Must run under the project lock."""
    version = (
        PolicyVersion.objects.select_for_update()
        .filter(project=project, status=VersionStatus.ACTIVE)
        .first()
    )
    if version is None:  # every project gets v1 at creation; this is a broken invariant
        raise Conflict(f"{project.name} has no active policy version.")
    return version


def _announce_active(project_id: int, version_id: int) -> None:
    transaction.on_commit(
        lambda: signals.active_version_changed.send(
            sender=PolicyVersion, project_id=project_id, version_id=version_id
        ),
        robust=True,
    )


def _announce_decided(revision: SkillRevision, outcome: str, actor_label: str) -> None:
    transaction.on_commit(
        lambda: signals.revision_decided.send(
            sender=SkillRevision, revision=revision, outcome=outcome, actor_label=actor_label
        ),
        robust=True,
    )


def _set_status(obj: Any, status: str, now: Any, **fields: Any) -> None:
    obj.status = status
    obj.status_changed_at = now
    for name, value in fields.items():
        setattr(obj, name, value)
    obj.save(update_fields=["status", "status_changed_at", *fields])


def _revisions_follow(
    project: Project, new: PolicyVersion, *, actor: Any, label: str, now: Any
) -> tuple[list[SkillRevision], list[SkillRevision]]:
    """Make the revisions' statuses say what agents run with now that ``new`` is active: the
    ones it holds read APPROVED (and no longer rolled back: they are live), every other
    APPROVED one of the project reads SUPERSEDED. Under the project lock. Returns (approved,
    superseded): the rows whose status changed."""
    live = PolicyVersion.revisions.through.objects.filter(policyversion_id=new.pk).values(
        "skillrevision_id"
    )
    user = permissions.actor_user(actor)
    locked = SkillRevision.objects.select_for_update(of=("self",)).select_related("skill")
    superseded = list(
        locked.filter(skill__project=project, status=RevisionStatus.APPROVED)
        .exclude(pk__in=live)
        .order_by("skill__slug", "number")
    )
    restored = list(
        locked.filter(pk__in=live)
        .filter(~Q(status=RevisionStatus.APPROVED) | Q(rolled_back_at__isnull=False))
        .order_by("skill__slug", "number")
    )
    for revision in superseded:
        _set_status(
            revision, RevisionStatus.SUPERSEDED, now, decided_by=user, decided_by_label=label
        )
    approved = []
    for revision in restored:
        if revision.status == RevisionStatus.APPROVED:  # live already; only the mark goes
            revision.rolled_back_at = None
            revision.save(update_fields=["rolled_back_at"])
            continue
        _set_status(
            revision,
            RevisionStatus.APPROVED,
            now,
            decided_by=user,
            decided_by_label=label,
            rolled_back_at=None,
        )
        approved.append(revision)
    return approved, superseded


def _activate(
    *,
    project: Project,
    old: PolicyVersion,
    new: PolicyVersion,
    kind: str,
    actor: Any,
    label: str,
    reason: str,
    now: Any,
    revisions: list[SkillRevision] | None = None,
    rolled_back: bool = False,
) -> tuple[list[SkillRevision], list[SkillRevision]]:
    """Retire ``old`` and make ``new`` active (a new one, saved here with ``revisions``); the
    revisions' statuses follow (``_revisions_follow``, whose result this returns); record the
    release. Under the project lock. The old one is retired first: the partial unique index
    allows one active row at a time."""
    _set_status(old, VersionStatus.RETIRED, now, **({"rolled_back_at": now} if rolled_back else {}))
    if new.pk is None:
        new.status = VersionStatus.ACTIVE
        new.status_changed_at = now
        new.save()
        new.revisions.set(revisions or [])
    else:
        _set_status(new, VersionStatus.ACTIVE, now)
    approved, superseded = _revisions_follow(project, new, actor=actor, label=label, now=now)
    Release.objects.create(
        project=project,
        kind=kind,
        from_version=old,
        to_version=new,
        actor=permissions.actor_user(actor),
        actor_label=label,
        reason=reason,
        created_at=now,
    )
    after: dict[str, Any] = {"active": new.number}
    if approved or superseded:
        after["revisions"] = {
            "approved": [str(r) for r in approved],
            "superseded": [str(r) for r in superseded],
        }
    audit_record(
        action=f"policy_version.{kind}",
        project=project,
        actor=actor,
        actor_label=label,
        obj=new,
        before={"active": old.number},
        after=after,
        message=reason,
    )
    _announce_active(project.pk, new.pk)
    return approved, superseded


def _refuse_if_out_of_date(revision: SkillRevision) -> None:
    """Refuse (Conflict, naming it) a proposal older than a revision of the same skill that was
    approved since: approving or editing it would bring older text back. Approving supersedes
    such proposals; this catches the ones left PROPOSED before it did."""
    newer = (
        SkillRevision.objects.filter(skill_id=revision.skill_id, number__gt=revision.number)
        .filter(
            Q(status=RevisionStatus.APPROVED)
            | Q(policy_versions__status__in=[VersionStatus.ACTIVE, VersionStatus.RETIRED])
        )
        .order_by("-number")
        .only("number")
        .first()
    )
    if newer is not None:
        slug = revision.skill.slug
        raise Conflict(
            f"{slug} r{revision.number} is out of date: r{newer.number} is newer and was "
            f"approved, so r{revision.number} could only bring older text back. Reject it, or "
            f"propose a change to {slug} r{newer.number}."
        )


def _lock_proposed(
    revision: SkillRevision, actor: Any, actor_label: str, *, current: bool = False
) -> tuple[Project, SkillRevision, str]:
    """The start of every decision on a revision: lock the project, then the revision (the lock
    order above), check the reviewer's role and that the revision is still PROPOSED (and with
    ``current``, not older than an approved revision of its skill). Returns the locked project
    and revision and how the audit log names the actor."""
    project = _lock_project(revision.skill.project_id)
    permissions.require_role(actor, project, Role.REVIEWER)
    revision = SkillRevision.objects.select_for_update().select_related("skill").get(pk=revision.pk)
    if revision.status != RevisionStatus.PROPOSED:
        raise Conflict(_revision_decided_message(revision))
    if current:
        _refuse_if_out_of_date(revision)
    return project, revision, permissions.actor_label(actor, actor_label)


def _revision_close(
    revision: SkillRevision,
    status: str,
    *,
    project: Project,
    actor: Any,
    label: str,
    audit: dict[str, Any],
    reason: str = "",
) -> None:
    """A decision's end: the revision's new status and who gave it, the audit event (``audit``:
    its action and extra ``after`` fields) and the announcement after commit."""
    fields: dict[str, Any] = {"decision_reason": reason} if reason else {}
    _set_status(
        revision,
        status,
        timezone.now(),
        decided_by=permissions.actor_user(actor),
        decided_by_label=label,
        **fields,
    )
    audit_record(
        action=audit["action"],
        project=project,
        actor=actor,
        actor_label=label,
        obj=revision,
        before={"status": RevisionStatus.PROPOSED},
        after={"status": status, **audit.get("after", {})},
        message=reason,
    )
    _announce_decided(revision, RevisionStatus(status).value, label)


def _second_person_required(
    project: Project, revision: SkillRevision, person: int | None, label: str
) -> None:
    """With ``require_second_approver``: refuse (Conflict) an approval that cannot count as a
    second, different person. People are compared, not labels: a decision made with an API key
    counts as the key's owner (``base.permissions.person_id``), so a dashboard approval and the
    same person's key are one reviewer. An approval no person can be named for (a key made by a
    command, a task) counts for no one, first or second: nobody could tell it apart from the
    other reviewer."""
    if person is None:
        raise Conflict(
            f"{project.name} needs two different people to approve, and {label} is not tied to "
            "a person (an API key made by a command has no owner). Approve in the dashboard, "
            "with an approval link, or with an API key made in the dashboard."
        )
    if not revision.first_approved_by_label:
        return
    first = revision.first_approved_by_label
    if revision.first_approved_by_id is None:
        raise Conflict(
            f"The first approval ({first}) is not tied to a person, so no second approval can "
            "be told apart from it. Reject this revision, or edit it into a new proposal."
        )
    if revision.first_approved_by_id == person:
        if first == label:
            raise Conflict(
                f"{label} gave the first approval; this project needs a second, different reviewer."
            )
        name = revision.first_approved_by.get_username()
        raise Conflict(
            f"{first} and {label} are the same person ({name}): this project needs a second, "
            "different reviewer."
        )


def _supersede_older_proposals(
    revision: SkillRevision, *, project: Project, actor: Any, label: str
) -> list[SkillRevision]:
    """The proposals of the skill older than ``revision``, which is going live, become
    SUPERSEDED: approving one later would put older text live again. Under the project lock."""
    older = list(
        SkillRevision.objects.select_for_update(of=("self",))
        .select_related("skill")
        .filter(
            skill_id=revision.skill_id, status=RevisionStatus.PROPOSED, number__lt=revision.number
        )
        .order_by("number")
    )
    for proposal in older:
        _revision_close(
            proposal,
            RevisionStatus.SUPERSEDED,
            project=project,
            actor=actor,
            label=label,
            audit={"action": "skill_revision.supersede", "after": {"replaced_by": revision.number}},
        )
    return older


# Judge states in which a chat link may not approve: no verdict yet, or none to be had.
_JUDGE_NOT_PASSED_YET = {
    judge.PENDING: "it is waiting for one",
    judge.RUNNING: "it is reading the skill now",
    judge.UNAVAILABLE: "it could not give one",
}


def _risk_override(
    project: Project,
    revision: SkillRevision,
    actor: Any,
    label: str,
    override_reason: str,
    via_link: bool,
) -> None:
    """A flagged revision (``skills.library.risk``) goes live only on a reviewer's typed reason,
    given where the findings are shown (the dashboard, the API), never from a chat link: a
    one-click approval of text that may carry an attacker's instruction. The override is
    audited with the findings it overrode. Under the approval's locks."""
    if via_link and revision.judge_status in _JUDGE_NOT_PASSED_YET:
        # The first notification goes out before the LLM judge has read the skill (it runs on
        # the slow queue); until it passes, a one-click approval would skip its verdict.
        raise Conflict(
            f"{revision.skill.slug} r{revision.number} has no verdict from the LLM judge "
            f"({_JUDGE_NOT_PASSED_YET[revision.judge_status]}), so it cannot be approved from "
            "a link. Open it in MetaClaw to read it and approve it there.",
            code="judge_pending",
        )
    flagged = [f for f in revision.risk_findings or [] if f.get("severity") == risk.FLAG]
    if not flagged:
        return
    kinds = ", ".join(sorted({f["kind"] for f in flagged}))
    if via_link:
        raise Conflict(
            f"{revision.skill.slug} r{revision.number} was flagged by the risk check ({kinds}); "
            "it cannot be approved from a link. Open it in MetaClaw, read the findings and "
            "approve there with a reason.",
            code="risk_flagged",
        )
    override_reason = (override_reason or "").strip()
    if not override_reason:
        raise DomainError(
            f"The risk check flagged this revision ({kinds}): type why it is safe to approve.",
            code="risk_flagged",
            field="override_reason",
        )
    audit_record(
        action="skill_revision.risk_override",
        project=project,
        actor=actor,
        actor_label=label,
        obj=revision,
        after={"findings": [{k: f[k] for k in ("kind", "field", "text")} for f in flagged]},
        message=override_reason,
    )


@transaction.atomic
def skill_revision_approve(
    *,
    revision: SkillRevision,
    actor: Any,
    actor_label: str = "",
    reason: str = "",
    api_key: ApiKey | None = None,
    override_reason: str = "",
    via_link: bool = False,
) -> SkillRevision:
    """Approve a PROPOSED revision. It goes live at once in a new active policy version (the
    active set with this skill's previous revision replaced), and the skill's older proposals
    are superseded; with ``require_second_approver`` the first approval is only recorded and
    the revision stays PROPOSED (``_second_person_required`` says who may give the second).
    Refused (Conflict) for a proposal older than a revision of its skill approved since.
    ``api_key``: the key a machine actor decides with (its owner is the person it counts as).
    A revision the risk check flagged needs ``override_reason`` (audited) and is refused from a
    chat link or a Slack button (``via_link``): ``_risk_override``."""
    if api_key is not None and not actor_label:
        actor_label = permissions.api_key_label(api_key)
    project, revision, label = _lock_proposed(revision, actor, actor_label, current=True)
    _risk_override(project, revision, actor, label, override_reason, via_link)
    now = timezone.now()
    if project.require_second_approver:
        person = permissions.person_id(actor, api_key)
        _second_person_required(project, revision, person, label)
        if not revision.first_approved_by_label:
            revision.first_approved_by_id = person
            revision.first_approved_by_label = label
            revision.first_approved_at = now
            revision.save(
                update_fields=["first_approved_by", "first_approved_by_label", "first_approved_at"]
            )
            audit_record(
                action=FIRST_APPROVAL_ACTION,
                project=project,
                actor=actor,
                actor_label=label,
                obj=revision,
                after={"first_approved_by": label},
                message=reason,
            )
            return revision
    older = _supersede_older_proposals(revision, project=project, actor=actor, label=label)
    active = _active_version(project)
    kept = [r for r in active.revisions.all() if r.skill_id != revision.skill_id]
    _set_status(
        revision,
        RevisionStatus.APPROVED,
        now,
        decided_by=permissions.actor_user(actor),
        decided_by_label=label,
        decision_reason=reason,
    )
    version = PolicyVersion(
        project=project,
        number=_next_version_number(project),
        parent=active,
        adapter_ref=active.adapter_ref,
        base_model=active.base_model,
        changelog=f"Approved {revision.skill.slug} r{revision.number}: {revision.name}",
        created_by=permissions.actor_user(actor),
        created_at=now,
    )
    _, superseded = _activate(
        project=project,
        old=active,
        new=version,
        kind=ReleaseKind.APPROVAL,
        actor=actor,
        label=label,
        reason=reason,
        now=now,
        revisions=[*kept, revision],
    )
    audit_record(
        action="skill_revision.approve",
        project=project,
        actor=actor,
        actor_label=label,
        obj=revision,
        before={"status": RevisionStatus.PROPOSED},
        after={
            "status": RevisionStatus.APPROVED,
            "version": version.number,
            "superseded": [r.number for r in superseded if r.skill_id == revision.skill_id],
            "superseded_proposals": [r.number for r in older],
        },
        message=reason,
    )
    _announce_decided(revision, "approved", label)
    return revision


@transaction.atomic
def skill_revision_reject(
    *, revision: SkillRevision, actor: Any, reason: str, actor_label: str = ""
) -> SkillRevision:
    """Reject a PROPOSED revision; a reason is required."""
    reason = _reason_required(reason)
    project, revision, label = _lock_proposed(revision, actor, actor_label)
    _revision_close(
        revision,
        RevisionStatus.REJECTED,
        project=project,
        actor=actor,
        label=label,
        audit={"action": "skill_revision.reject"},
        reason=reason,
    )
    return revision


@transaction.atomic
def skill_revision_edit(
    *,
    revision: SkillRevision,
    actor: Any,
    name: str,
    description: str,
    instructions: str,
    category: str,
    examples: list | None = None,
    actor_label: str = "",
) -> SkillRevision:
    """A reviewer's edit of a PROPOSED revision: a new PROPOSED revision (author human, parent
    the edited one, same evidence); the edited one becomes SUPERSEDED. Returns the new one.
    Refused (Conflict) for a proposal older than a revision of its skill approved since."""
    project, revision, label = _lock_proposed(revision, actor, actor_label, current=True)
    new_revision = skill_revision_propose(
        project=project,
        draft=RevisionDraft(
            slug=revision.skill.slug,
            name=name,
            description=description,
            instructions=instructions,
            category=category,
            examples=revision.examples if examples is None else examples,
            author=Author.HUMAN,
            origin=Origin.HUMAN,
            parent=revision,
            source_groups=list(revision.source_groups.all()),
            source_incidents=list(revision.source_incidents.all()),
            diagnosis=revision.diagnosis,
            redactions=revision.redactions,
        ),
        created_by=actor,
        actor_label=label,
    )
    _revision_close(
        revision,
        RevisionStatus.SUPERSEDED,
        project=project,
        actor=actor,
        label=label,
        audit={"action": "skill_revision.edit", "after": {"replaced_by": new_revision.number}},
    )
    return new_revision


def _check_composition(project: Project, chosen: list[SkillRevision]) -> None:
    """A candidate's revisions: this project's, at most one per skill, and each one approved
    (APPROVED now, or held by a version that was active): promoting a candidate must never put
    text live that no reviewer approved. Refusals are DomainErrors on ``revisions``."""
    if any(r.skill.project_id != project.pk for r in chosen):
        raise DomainError("Every revision must belong to this project.", field="revisions")
    if len({r.skill_id for r in chosen}) != len(chosen):
        raise DomainError("At most one revision per skill.", field="revisions")
    approved = set(
        SkillRevision.objects.filter(pk__in=[r.pk for r in chosen])
        .filter(
            Q(status=RevisionStatus.APPROVED)
            | Q(policy_versions__status__in=[VersionStatus.ACTIVE, VersionStatus.RETIRED])
        )
        .values_list("pk", flat=True)
    )
    never = [r for r in chosen if r.pk not in approved]
    if never:
        names = ", ".join(f"{r.skill.slug} r{r.number} ({r.status})" for r in never)
        raise DomainError(
            f"{names} {'was' if len(never) == 1 else 'were'} never approved: a candidate holds "
            "only approved revisions (approve a proposal first).",
            field="revisions",
        )


@transaction.atomic
def policy_version_create_candidate(
    *,
    project: Project,
    adapter_ref: str | None = None,
    base_model: str | None = None,
    changelog: str = "",
    actor: Any = None,
    actor_label: str = "",
    revisions: list[SkillRevision] | None = None,
) -> PolicyVersion:
    """A CANDIDATE version built on the active one: the slow loop's new adapter, or one an
    admin composed (the API's ``POST /versions``, the dashboard's compose page). It holds the
    active version's skill revisions, or the given ones (``_check_composition``); the given
    adapter and base model, or (None) the active version's. It waits for an admin to promote
    or reject it."""
    project = _lock_project(project.pk)
    permissions.require_role(actor, project, Role.ADMIN)
    active = _active_version(project)
    if revisions is None:
        chosen = list(active.revisions.all())
    else:
        chosen = list(revisions)
        _check_composition(project, chosen)
    label = permissions.actor_label(actor, actor_label)
    adapter_ref = active.adapter_ref if adapter_ref is None else adapter_ref.strip()
    base_model = active.base_model if base_model is None else base_model.strip()
    changelog = (changelog or "").strip() or (
        f"Composed by {label}: {len(chosen)} skill{'' if len(chosen) == 1 else 's'}, "
        f"{f'adapter {adapter_ref}' if adapter_ref else 'no adapter'}."
    )
    version = PolicyVersion.objects.create(
        project=project,
        number=_next_version_number(project),
        parent=active,
        adapter_ref=adapter_ref,
        base_model=base_model,
        changelog=changelog,
        created_by=permissions.actor_user(actor),
        status=VersionStatus.CANDIDATE,
        status_changed_at=timezone.now(),
    )
    version.revisions.set(chosen)
    audit_record(
        action="policy_version.create_candidate",
        project=project,
        actor=actor,
        actor_label=label,
        obj=version,
        after={
            "number": version.number,
            "parent": active.number,
            "adapter_ref": version.adapter_ref,
            "base_model": version.base_model,
            "skills": len(chosen),
            "revisions": sorted(str(r) for r in chosen),
        },
    )
    transaction.on_commit(
        lambda: signals.version_candidate_created.send(sender=PolicyVersion, version=version),
        robust=True,
    )
    return version


def _lock_version(version: PolicyVersion) -> tuple[Project, PolicyVersion]:
    project = _lock_project(version.project_id)
    version = PolicyVersion.objects.select_for_update().filter(pk=version.pk).first()
    if version is None:
        raise NotFound("No such policy version.")
    return project, version


def _refuse_an_unexpected_replacement(
    version: PolicyVersion, active: PolicyVersion, replaces: int | None
) -> None:
    """A promotion replaces the active version; refuse (Conflict, naming it) when that is not
    the version the caller decided to replace. ``replaces`` names it explicitly; without it,
    the version the candidate was built on must still be the active one. So of two candidates
    promoted at the same instant the second is told which version now stands in its way,
    instead of silently retiring the first. Under the project lock."""
    if replaces is not None and replaces != active.number:
        raise Conflict(
            f"v{active.number} is active, not v{replaces} ({_how_active(active)}). Look at what "
            f"promoting v{version.number} changes now, then confirm again."
        )
    if version.parent_id in (None, active.pk):
        return
    parent = PolicyVersion.objects.filter(pk=version.parent_id).first()
    built_on = f"v{parent.number}" if parent else "a deleted version"
    theirs = set(version.revisions.values_list("pk", flat=True))
    ours = set(active.revisions.values_list("pk", flat=True))
    if theirs != ours:
        # Built on a version that is no longer active (e.g. skills were approved while an
        # adapter trained): promoting it as is would silently undo those changes.
        raise Conflict(
            f"v{version.number} was built on {built_on}, but v{active.number} is active now "
            f"with other skills; promoting v{version.number} would undo those changes. Offer "
            f"a new candidate built on v{active.number}."
        )
    if replaces is None:
        raise Conflict(
            f"v{version.number} was built on {built_on}, but v{active.number} is active now "
            f"({_how_active(active)}); promoting v{version.number} would replace "
            f"v{active.number}. Look at the difference, then confirm that v{active.number} is "
            "the version to replace."
        )


@transaction.atomic
def policy_version_promote(
    *,
    version: PolicyVersion,
    actor: Any,
    reason: str = "",
    actor_label: str = "",
    replaces: int | None = None,
) -> PolicyVersion:
    """CANDIDATE → ACTIVE; the active one is retired (the release names it: ``from_version``).
    ``replaces``: the number of the version the caller means to replace, the one active when
    they decided; refused (Conflict) when another one is active by now, and, without
    ``replaces``, when the candidate was built on a version that is no longer active; and
    (Conflict, code ``replay_gate``) when the project requires a replay gate that this
    candidate has not passed (``skills.signals.version_promoting``)."""
    project, version = _lock_version(version)
    permissions.require_role(actor, project, Role.ADMIN)
    if version.status != VersionStatus.CANDIDATE:
        raise Conflict(_version_decided_message(version))
    active = _active_version(project)
    _refuse_an_unexpected_replacement(version, active, replaces)
    # Checks of the capabilities above versions (the replay gate) may refuse, with Conflict.
    signals.version_promoting.send(sender=PolicyVersion, project=project, version=version)
    _activate(
        project=project,
        old=active,
        new=version,
        kind=ReleaseKind.PROMOTION,
        actor=actor,
        label=permissions.actor_label(actor, actor_label),
        reason=(reason or "").strip(),
        now=timezone.now(),
    )
    return version


@transaction.atomic
def policy_version_reject(
    *, version: PolicyVersion, actor: Any, reason: str, actor_label: str = ""
) -> PolicyVersion:
    """CANDIDATE → REJECTED; a reason is required."""
    reason = _reason_required(reason)
    project, version = _lock_version(version)
    permissions.require_role(actor, project, Role.ADMIN)
    if version.status != VersionStatus.CANDIDATE:
        raise Conflict(_version_decided_message(version))
    _set_status(version, VersionStatus.REJECTED, timezone.now())
    audit_record(
        action="policy_version.reject",
        project=project,
        actor=actor,
        actor_label=permissions.actor_label(actor, actor_label),
        obj=version,
        before={"status": VersionStatus.CANDIDATE},
        after={"status": VersionStatus.REJECTED},
        message=reason,
    )
    return version


@transaction.atomic
def policy_version_rollback(
    *, to_version: PolicyVersion, actor: Any, reason: str, actor_label: str = ""
) -> PolicyVersion:
    """Make a RETIRED version active again (a new Release; nothing is deleted). The version
    rolled back from, and its revisions that ``to_version`` lacks, get ``rolled_back_at`` so
    their data leaves training and the fast loop does not propose them again unchanged; those
    revisions read SUPERSEDED and ``to_version``'s read APPROVED again (``_revisions_follow``)."""
    reason = _reason_required(reason)
    project, to_version = _lock_version(to_version)
    permissions.require_role(actor, project, Role.ADMIN)
    if to_version.status != VersionStatus.RETIRED:
        raise Conflict(
            f"Only a retired version can be rolled back to. {_version_decided_message(to_version)}"
        )
    now = timezone.now()
    current = _active_version(project)
    dropped = current.revisions.exclude(pk__in=to_version.revisions.values("pk"))
    dropped_numbers = [f"{slug} r{n}" for slug, n in dropped.values_list("skill__slug", "number")]
    SkillRevision.objects.filter(pk__in=dropped.values("pk")).update(rolled_back_at=now)
    _activate(
        project=project,
        old=current,
        new=to_version,
        kind=ReleaseKind.ROLLBACK,
        actor=actor,
        label=permissions.actor_label(actor, actor_label),
        reason=reason,
        now=now,
        rolled_back=True,
    )
    if dropped_numbers:
        audit_record(
            action="skill_revision.rolled_back",
            project=project,
            actor=actor,
            actor_label=permissions.actor_label(actor, actor_label),
            obj=current,
            after={"revisions": dropped_numbers},
            message=reason,
        )
    return to_version
