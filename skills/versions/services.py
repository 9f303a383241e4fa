"""Reviews and versions' writes: every decision that changes what agents run with. Approving
or rejecting a revision, a reviewer's edit, candidate versions (from the slow loop), promotion,
rejection and rollback, and a new project's first version. The dashboard, the API, approval
links and Celery tasks all call these.

One module on purpose (a little past 500 lines): every decision takes the same locks in the same
order (the project, then the version or revision) and ends the same way (status, audit event,
announcement after commit); split, that lock order would live in several places."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from base import permissions
from base.errors import Conflict, DomainError, NotFound
from base.models import Project, Role
from base.services import audit_record
from skills import signals
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
    """The "already approved by X at T" message."""
    who = revision.decided_by_label or "someone"
    return (
        f"{revision.skill.slug} r{revision.number} was already {revision.status} by {who} "
        f"at {_when(revision.status_changed_at)}."
    )


def _version_decided_message(version: PolicyVersion) -> str:
    release = (
        Release.objects.filter(to_version=version).order_by("-created_at", "-id").first()
        if version.status == VersionStatus.ACTIVE
        else None
    )
    if release is not None:
        return (
            f"v{version.number} is already active ({release.get_kind_display().lower()} by "
            f"{release.actor_label or 'someone'} at {_when(release.created_at)})."
        )
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
    rolled_back: bool = False,
) -> Release:
    """Retire ``old`` and make ``new`` active; record the release. Under the project lock.
    The old one is retired first: the partial unique index allows one active row at a time."""
    _set_status(old, VersionStatus.RETIRED, now, **({"rolled_back_at": now} if rolled_back else {}))
    if new.pk is None:
        new.status = VersionStatus.ACTIVE
        new.status_changed_at = now
        new.save()
    else:
        _set_status(new, VersionStatus.ACTIVE, now)
    release = Release.objects.create(
        project=project,
        kind=kind,
        from_version=old,
        to_version=new,
        actor=permissions.actor_user(actor),
        actor_label=label,
        reason=reason,
        created_at=now,
    )
    audit_record(
        action=f"policy_version.{kind}",
        project=project,
        actor=actor,
        actor_label=label,
        obj=new,
        before={"active": old.number},
        after={"active": new.number},
        message=reason,
    )
    _announce_active(project.pk, new.pk)
    return release


def _lock_proposed(
    revision: SkillRevision, actor: Any, actor_label: str
) -> tuple[Project, SkillRevision, str]:
    """The start of every decision on a revision: lock the project, then the revision (the lock
    order above), check the reviewer's role and that the revision is still PROPOSED. Returns the
    locked project and revision and how the audit log names the actor."""
    project = _lock_project(revision.skill.project_id)
    permissions.require_role(actor, project, Role.REVIEWER)
    revision = SkillRevision.objects.select_for_update().select_related("skill").get(pk=revision.pk)
    if revision.status != RevisionStatus.PROPOSED:
        raise Conflict(_revision_decided_message(revision))
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


@transaction.atomic
def skill_revision_approve(
    *, revision: SkillRevision, actor: Any, actor_label: str = "", reason: str = ""
) -> SkillRevision:
    """Approve a PROPOSED revision. It goes live at once in a new active policy version (the
    active set with this skill's previous revision replaced); with ``require_second_approver``
    the first approval is only recorded and the revision stays PROPOSED."""
    project, revision, label = _lock_proposed(revision, actor, actor_label)
    now = timezone.now()
    if project.require_second_approver:
        if not revision.first_approved_by_label:
            revision.first_approved_by = permissions.actor_user(actor)
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
        if revision.first_approved_by_label == label:
            raise Conflict(
                f"{label} gave the first approval; this project needs a second, different reviewer."
            )
    active = _active_version(project)
    kept = [r for r in active.revisions.all() if r.skill_id != revision.skill_id]
    superseded = list(
        SkillRevision.objects.select_for_update()
        .filter(skill_id=revision.skill_id, status=RevisionStatus.APPROVED)
        .exclude(pk=revision.pk)
    )
    for old_revision in superseded:
        _set_status(old_revision, RevisionStatus.SUPERSEDED, now, decided_by_label=label)
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
    _activate(
        project=project,
        old=active,
        new=version,
        kind=ReleaseKind.APPROVAL,
        actor=actor,
        label=label,
        reason=reason,
        now=now,
    )
    version.revisions.set([*kept, revision])
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
            "superseded": [r.number for r in superseded],
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
    the edited one, same evidence); the edited one becomes SUPERSEDED. Returns the new one."""
    project, revision, label = _lock_proposed(revision, actor, actor_label)
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


@transaction.atomic
def policy_version_create_candidate(
    *,
    project: Project,
    adapter_ref: str,
    base_model: str,
    changelog: str,
    actor: Any = None,
    actor_label: str = "",
    revisions: list[SkillRevision] | None = None,
) -> PolicyVersion:
    """A CANDIDATE version (e.g. the slow loop's new adapter) with the active version's skill
    revisions, or the given ones. It waits for an admin to promote or reject it."""
    project = _lock_project(project.pk)
    permissions.require_role(actor, project, Role.ADMIN)
    active = _active_version(project)
    if revisions is None:
        chosen = list(active.revisions.all())
    else:
        chosen = list(revisions)
        if any(r.skill.project_id != project.pk for r in chosen):
            raise DomainError("Every revision must belong to this project.", field="revisions")
        if len({r.skill_id for r in chosen}) != len(chosen):
            raise DomainError("At most one revision per skill.", field="revisions")
    label = permissions.actor_label(actor, actor_label)
    version = PolicyVersion.objects.create(
        project=project,
        number=_next_version_number(project),
        parent=active,
        adapter_ref=adapter_ref or "",
        base_model=base_model or "",
        changelog=changelog or "",
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
            "adapter_ref": version.adapter_ref,
            "base_model": version.base_model,
            "skills": len(chosen),
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


@transaction.atomic
def policy_version_promote(
    *, version: PolicyVersion, actor: Any, reason: str = "", actor_label: str = ""
) -> PolicyVersion:
    """CANDIDATE → ACTIVE; the active one is retired."""
    project, version = _lock_version(version)
    permissions.require_role(actor, project, Role.ADMIN)
    if version.status != VersionStatus.CANDIDATE:
        raise Conflict(_version_decided_message(version))
    active = _active_version(project)
    if active is not None and version.parent_id not in (None, active.pk):
        # Built on a version that is no longer active (e.g. skills were approved while an
        # adapter trained): promoting it as is would silently undo those changes.
        theirs = set(version.revisions.values_list("pk", flat=True))
        ours = set(active.revisions.values_list("pk", flat=True))
        if theirs != ours:
            parent = PolicyVersion.objects.filter(pk=version.parent_id).first()
            raise Conflict(
                f"v{version.number} was built on v{parent.number if parent else '?'}, but "
                f"v{active.number} is active now with other skills; promoting v{version.number} "
                f"would undo those changes. Offer a new candidate built on v{active.number}."
            )
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
    their data leaves training and the fast loop does not propose them again unchanged."""
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
