from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.db import connection

from base.errors import Conflict, DomainError, PermissionDenied
from base.models import AuditEvent
from skills import signals
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions import services as version_services
from skills.versions.models import PolicyVersion, Release, ReleaseKind, VersionStatus
from tests import factories

pytestmark = pytest.mark.django_db

# Every status a revision leaves "proposed" for: no decision applies to it any more.
DECIDED_STATUSES = [RevisionStatus.APPROVED, RevisionStatus.REJECTED, RevisionStatus.SUPERSEDED]


def snapshot(project) -> dict:
    """Everything a refused decision must leave untouched."""
    return {
        "revisions": sorted(
            SkillRevision.objects.filter(skill__project=project).values_list(
                "id", "status", "first_approved_by_id", "rolled_back_at"
            )
        ),
        "versions": sorted(
            PolicyVersion.objects.filter(project=project).values_list(
                "id", "number", "status", "rolled_back_at"
            )
        ),
        "releases": Release.objects.filter(project=project).count(),
        "audit": AuditEvent.objects.filter(project=project).count(),
    }


@contextmanager
def nothing_changes(project) -> Iterator[None]:
    """The block (a refused decision) leaves ``snapshot(project)`` as it was."""
    before = snapshot(project)
    yield
    assert snapshot(project) == before


def active(project) -> PolicyVersion:
    return PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)


def revision_in(project, status: str) -> SkillRevision:
    """A revision already moved to ``status``, as a refused decision finds it."""
    revision = factories.make_revision(project)
    SkillRevision.objects.filter(pk=revision.pk).update(status=status)
    return revision


def make_candidate(project) -> PolicyVersion:
    return version_services.policy_version_create_candidate(
        project=project, adapter_ref="a", base_model="m", changelog="c"
    )


def version_in(project, status: str) -> PolicyVersion:
    """A policy version already moved to ``status``, as a refused transition finds it."""
    version = make_candidate(project)
    PolicyVersion.objects.filter(pk=version.pk).update(status=status)
    return version


@pytest.fixture
def reviewer(project):
    return factories.make_member(project, "reviewer")


@pytest.fixture
def admin(project):
    return factories.make_member(project, "admin")


# --- approve ---------------------------------------------------------------------------------


def test_approving_a_proposal_publishes_a_new_active_version_with_it(project, reviewer):
    revision = factories.make_revision(project)

    version_services.skill_revision_approve(revision=revision, actor=reviewer, reason="looks right")

    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    assert revision.decided_by == reviewer
    version = active(project)
    assert version.number == 2
    assert version.parent.number == 1
    assert list(version.revisions.all()) == [revision]
    assert PolicyVersion.objects.get(project=project, number=1).status == VersionStatus.RETIRED
    release = Release.objects.get(project=project, kind=ReleaseKind.APPROVAL)
    assert (release.from_version.number, release.to_version.number) == (1, 2)
    assert release.actor == reviewer and release.reason == "looks right"
    assert AuditEvent.objects.filter(action="skill_revision.approve", actor=reviewer).exists()


def test_approving_a_new_revision_replaces_the_skills_previous_one_and_keeps_the_others(
    project, reviewer
):
    first = factories.make_revision(project)
    other = factories.make_revision(project, slug="be-polite", name="Be polite")
    version_services.skill_revision_approve(revision=first, actor=reviewer)
    version_services.skill_revision_approve(revision=other, actor=reviewer)
    second = factories.make_revision(
        project, instructions="Always pass dates as ISO 8601 (YYYY-MM-DD)."
    )

    version_services.skill_revision_approve(revision=second, actor=reviewer)

    assert set(active(project).revisions.all()) == {other, second}
    first.refresh_from_db()
    assert first.status == RevisionStatus.SUPERSEDED
    assert active(project).number == 4


@pytest.mark.parametrize("status", DECIDED_STATUSES)
def test_approve_refuses_a_revision_that_is_not_proposed_and_changes_nothing(
    project, reviewer, status
):
    revision = revision_in(project, status)

    with nothing_changes(project), pytest.raises(Conflict, match=f"already {status}"):
        version_services.skill_revision_approve(revision=revision, actor=reviewer)


def test_second_approval_says_who_approved_first_and_when(project, reviewer):
    revision = factories.make_revision(project)
    version_services.skill_revision_approve(revision=revision, actor=reviewer)
    late = factories.make_member(project, "reviewer")

    with pytest.raises(Conflict) as exc:
        version_services.skill_revision_approve(revision=revision, actor=late)

    assert f"already approved by {reviewer.username} at" in str(exc.value)


def test_a_viewer_cannot_approve_and_nothing_changes(project):
    viewer = factories.make_member(project, "viewer")
    revision = factories.make_revision(project)

    with nothing_changes(project), pytest.raises(PermissionDenied):
        version_services.skill_revision_approve(revision=revision, actor=viewer)


def test_a_member_of_another_project_cannot_approve(project, other_project):
    outsider = factories.make_member(other_project, "admin")
    revision = factories.make_revision(project)

    with pytest.raises(PermissionDenied):
        version_services.skill_revision_approve(revision=revision, actor=outsider)


def test_a_machine_actor_approves_under_its_label(project):
    revision = factories.make_revision(project)

    version_services.skill_revision_approve(
        revision=revision, actor=None, actor_label="api-key:ab12cd34"
    )

    assert Release.objects.get(kind=ReleaseKind.APPROVAL).actor_label == "api-key:ab12cd34"
    assert AuditEvent.objects.get(action="skill_revision.approve").actor_label == "api-key:ab12cd34"


def test_with_a_second_approver_required_the_first_approval_keeps_it_proposed(project, reviewer):
    project.require_second_approver = True
    project.save()
    revision = factories.make_revision(project)

    version_services.skill_revision_approve(revision=revision, actor=reviewer)

    revision.refresh_from_db()
    assert revision.status == RevisionStatus.PROPOSED
    assert revision.first_approved_by == reviewer
    assert active(project).number == 1


def test_with_a_second_approver_required_the_same_person_cannot_approve_twice(project, reviewer):
    project.require_second_approver = True
    project.save()
    revision = factories.make_revision(project)
    version_services.skill_revision_approve(revision=revision, actor=reviewer)

    with nothing_changes(project), pytest.raises(Conflict, match="second, different reviewer"):
        version_services.skill_revision_approve(revision=revision, actor=reviewer)


def test_with_a_second_approver_required_a_different_reviewer_makes_it_live(project, reviewer):
    project.require_second_approver = True
    project.save()
    revision = factories.make_revision(project)
    version_services.skill_revision_approve(revision=revision, actor=reviewer)
    second = factories.make_member(project, "reviewer")

    version_services.skill_revision_approve(revision=revision, actor=second)

    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    assert revision.decided_by == second
    assert list(active(project).revisions.all()) == [revision]


def test_approval_announces_the_decision_and_the_new_active_version_after_commit(
    project, reviewer, django_capture_on_commit_callbacks
):
    seen = []

    def on_decided(sender, revision, outcome, actor_label, **kw):
        seen.append(("decided", revision.pk, outcome, actor_label))

    def on_active(sender, project_id, version_id, **kw):
        seen.append(("active", project_id, version_id))

    signals.revision_decided.connect(on_decided)
    signals.active_version_changed.connect(on_active)
    try:
        revision = factories.make_revision(project)
        with django_capture_on_commit_callbacks(execute=True):
            version_services.skill_revision_approve(revision=revision, actor=reviewer)
    finally:
        signals.revision_decided.disconnect(on_decided)
        signals.active_version_changed.disconnect(on_active)

    assert ("decided", revision.pk, "approved", reviewer.username) in seen
    assert ("active", project.pk, active(project).pk) in seen


# --- reject and edit -------------------------------------------------------------------------


def test_rejecting_needs_a_reason_naming_the_field(project, reviewer):
    revision = factories.make_revision(project)

    with nothing_changes(project), pytest.raises(DomainError) as exc:
        version_services.skill_revision_reject(revision=revision, actor=reviewer, reason="  ")

    assert exc.value.field == "reason"


def test_rejecting_a_proposal_records_who_and_why(project, reviewer):
    revision = factories.make_revision(project)

    version_services.skill_revision_reject(revision=revision, actor=reviewer, reason="too vague")

    revision.refresh_from_db()
    assert revision.status == RevisionStatus.REJECTED
    assert revision.decision_reason == "too vague"
    assert revision.decided_by == reviewer
    assert active(project).number == 1


@pytest.mark.parametrize("status", DECIDED_STATUSES)
def test_reject_refuses_a_revision_that_is_not_proposed(project, reviewer, status):
    revision = revision_in(project, status)

    with nothing_changes(project), pytest.raises(Conflict):
        version_services.skill_revision_reject(revision=revision, actor=reviewer, reason="no")


def test_editing_makes_a_new_human_proposal_and_supersedes_the_edited_one(project, reviewer):
    revision = factories.make_revision(project)

    edited = version_services.skill_revision_edit(
        revision=revision,
        actor=reviewer,
        name="Use ISO 8601 dates",
        description="When a tool wants a date.",
        instructions="Pass dates as YYYY-MM-DD, never words like 'last week'.",
        category="common_mistakes",
    )

    revision.refresh_from_db()
    assert revision.status == RevisionStatus.SUPERSEDED
    assert edited.status == RevisionStatus.PROPOSED
    assert (edited.parent, edited.author, edited.origin) == (revision, "human", "human")
    assert edited.number == 2
    assert edited.created_by == reviewer


@pytest.mark.parametrize("status", DECIDED_STATUSES)
def test_edit_refuses_a_revision_that_is_not_proposed(project, reviewer, status):
    revision = revision_in(project, status)

    with nothing_changes(project), pytest.raises(Conflict):
        version_services.skill_revision_edit(
            revision=revision, actor=reviewer, name="x", description="y", instructions="z",
            category="general",
        )  # fmt: skip


def test_edit_with_empty_instructions_names_the_field_and_changes_nothing(project, reviewer):
    revision = factories.make_revision(project)

    with nothing_changes(project), pytest.raises(DomainError) as exc:
        version_services.skill_revision_edit(
            revision=revision, actor=reviewer, name="x", description="y", instructions=" ",
            category="general",
        )  # fmt: skip

    assert exc.value.field == "instructions"


# --- versions: candidate, promote, reject, roll back ----------------------------------------


def approved(project, reviewer, slug, **kw) -> SkillRevision:
    revision = factories.make_revision(project, slug=slug, **kw)
    version_services.skill_revision_approve(revision=revision, actor=reviewer)
    return revision


def test_a_candidate_carries_the_active_skills_and_waits(project, reviewer, admin):
    revision = approved(project, reviewer, "iso-dates")

    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://run/1", base_model="Qwen3-8B", changelog="LoRA",
        actor_label="training",
    )  # fmt: skip

    assert candidate.status == VersionStatus.CANDIDATE
    assert candidate.number == 3
    assert list(candidate.revisions.all()) == [revision]
    assert active(project).number == 2


def test_promoting_a_candidate_makes_it_the_only_active_version(project, admin):
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://run/1", base_model="m", changelog="c"
    )

    version_services.policy_version_promote(version=candidate, actor=admin, reason="eval +4%")

    assert active(project) == candidate
    assert PolicyVersion.objects.filter(project=project, status="active").count() == 1
    release = Release.objects.get(kind=ReleaseKind.PROMOTION)
    assert (release.from_version.number, release.to_version.number, release.actor) == (1, 2, admin)


def test_promote_refuses_a_candidate_built_before_skills_were_approved(project, admin, reviewer):
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://run/1", base_model="m", changelog="c"
    )
    version_services.skill_revision_approve(
        revision=factories.make_revision(project), actor=reviewer
    )

    with nothing_changes(project), pytest.raises(Conflict, match="would undo those changes"):
        version_services.policy_version_promote(version=candidate, actor=admin)

    candidate.refresh_from_db()
    assert candidate.status == "candidate"


def test_a_reviewer_cannot_promote(project, reviewer):
    candidate = make_candidate(project)

    with nothing_changes(project), pytest.raises(PermissionDenied):
        version_services.policy_version_promote(version=candidate, actor=reviewer)


@pytest.mark.parametrize("status", [VersionStatus.RETIRED, VersionStatus.REJECTED])
def test_promote_refuses_a_version_that_is_not_a_candidate(project, admin, status):
    version = version_in(project, status)

    with nothing_changes(project), pytest.raises(Conflict):
        version_services.policy_version_promote(version=version, actor=admin)


def test_promote_refuses_the_active_version_saying_it_is_active_already(project, admin):
    with nothing_changes(project), pytest.raises(Conflict, match="already active"):
        version_services.policy_version_promote(version=active(project), actor=admin)


def test_rejecting_a_candidate_needs_a_reason_and_keeps_the_active_one(project, admin):
    candidate = make_candidate(project)
    with pytest.raises(DomainError) as exc:
        version_services.policy_version_reject(version=candidate, actor=admin, reason="")
    assert exc.value.field == "reason"

    version_services.policy_version_reject(version=candidate, actor=admin, reason="worse on eval")

    candidate.refresh_from_db()
    assert candidate.status == VersionStatus.REJECTED
    assert active(project).number == 1
    with pytest.raises(Conflict):
        version_services.policy_version_reject(version=candidate, actor=admin, reason="again")


def test_rolling_back_reactivates_an_earlier_version_and_marks_what_was_dropped(
    project, reviewer, admin
):
    kept = approved(project, reviewer, "iso-dates")  # v2
    dropped = approved(project, reviewer, "be-polite", name="Be polite")  # v3
    v2 = PolicyVersion.objects.get(project=project, number=2)

    version_services.policy_version_rollback(to_version=v2, actor=admin, reason="v3 broke refunds")

    assert active(project) == v2
    v3 = PolicyVersion.objects.get(project=project, number=3)
    assert v3.status == VersionStatus.RETIRED and v3.rolled_back_at is not None
    dropped.refresh_from_db()
    kept.refresh_from_db()
    assert dropped.rolled_back_at is not None
    assert kept.rolled_back_at is None
    release = Release.objects.get(kind=ReleaseKind.ROLLBACK)
    assert (release.from_version, release.to_version) == (v3, v2)
    assert release.reason == "v3 broke refunds"
    assert PolicyVersion.objects.filter(project=project).count() == 3  # nothing deleted


@pytest.mark.parametrize("status", [VersionStatus.CANDIDATE, VersionStatus.REJECTED])
def test_rollback_refuses_a_version_that_was_never_active(project, admin, status):
    version = version_in(project, status)

    with nothing_changes(project), pytest.raises(Conflict):
        version_services.policy_version_rollback(to_version=version, actor=admin, reason="r")


def test_rollback_refuses_the_active_version_and_a_missing_reason(project, admin, reviewer):
    approved(project, reviewer, "iso-dates")

    with nothing_changes(project):
        with pytest.raises(Conflict):
            version_services.policy_version_rollback(
                to_version=active(project), actor=admin, reason="r"
            )
        with pytest.raises(DomainError) as exc:
            version_services.policy_version_rollback(
                to_version=PolicyVersion.objects.get(project=project, number=1),
                actor=admin,
                reason="",
            )

    assert exc.value.field == "reason"


def test_a_reviewer_cannot_roll_back(project, reviewer):
    approved(project, reviewer, "iso-dates")

    with nothing_changes(project), pytest.raises(PermissionDenied):
        version_services.policy_version_rollback(
            to_version=PolicyVersion.objects.get(project=project, number=1),
            actor=reviewer,
            reason="r",
        )


def test_approving_after_a_rollback_builds_on_the_rolled_back_to_version(project, reviewer, admin):
    a = approved(project, reviewer, "a-skill")  # v2
    approved(project, reviewer, "b-skill")  # v3
    version_services.policy_version_rollback(
        to_version=PolicyVersion.objects.get(project=project, number=2), actor=admin, reason="r"
    )
    c = factories.make_revision(project, slug="c-skill")

    version_services.skill_revision_approve(revision=c, actor=reviewer)

    version = active(project)
    assert version.number == 4
    assert version.parent.number == 2
    assert set(version.revisions.all()) == {a, c}


# --- concurrency -----------------------------------------------------------------------------


def _race(calls) -> list:
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            barrier.wait(timeout=10)
            results[i] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.django_db(transaction=True)
def test_two_approvals_at_once_give_consecutive_versions_and_one_active():
    project = factories.make_project()
    alice = factories.make_member(project, "reviewer")
    bob = factories.make_member(project, "reviewer")
    first, second = (
        factories.make_revision(project, slug="one"),
        factories.make_revision(project, slug="two"),
    )

    results = _race(
        [
            lambda: version_services.skill_revision_approve(revision=first, actor=alice),
            lambda: version_services.skill_revision_approve(revision=second, actor=bob),
        ]
    )

    assert not [r for r in results if isinstance(r, Exception)], results
    numbers = sorted(PolicyVersion.objects.filter(project=project).values_list("number", flat=True))
    assert numbers == [1, 2, 3]
    assert PolicyVersion.objects.filter(project=project, status="active").count() == 1
    assert set(active(project).revisions.all()) == {first, second}


@pytest.mark.django_db(transaction=True)
def test_two_people_approving_the_same_revision_one_wins_the_other_gets_a_conflict():
    project = factories.make_project()
    alice = factories.make_member(project, "reviewer")
    bob = factories.make_member(project, "reviewer")
    revision = factories.make_revision(project)

    results = _race(
        [
            lambda: version_services.skill_revision_approve(revision=revision, actor=alice),
            lambda: version_services.skill_revision_approve(revision=revision, actor=bob),
        ]
    )

    assert sum(isinstance(r, Conflict) for r in results) == 1
    assert PolicyVersion.objects.filter(project=project).count() == 2
    assert Release.objects.filter(project=project, kind=ReleaseKind.APPROVAL).count() == 1


@pytest.mark.django_db(transaction=True)
def test_promote_racing_a_rollback_never_leaves_two_active_versions():
    project = factories.make_project()
    admin = factories.make_member(project, "admin")
    approved(project, admin, "one")  # v2 active, v1 retired
    candidate = make_candidate(project)
    v1 = PolicyVersion.objects.get(project=project, number=1)

    results = _race(
        [
            lambda: version_services.policy_version_promote(version=candidate, actor=admin),
            lambda: version_services.policy_version_rollback(
                to_version=v1, actor=admin, reason="r"
            ),
        ]
    )

    errors = [r for r in results if isinstance(r, Exception)]
    assert PolicyVersion.objects.filter(project=project, status="active").count() == 1
    if errors:
        # The rollback won: promoting a candidate built on the rolled-back version would
        # bring its skills back, so the promotion is refused and changes nothing.
        assert len(errors) == 1 and isinstance(errors[0], Conflict), errors
        assert "would undo" in str(errors[0])
        assert Release.objects.filter(project=project).count() == 3
    else:
        assert Release.objects.filter(project=project).count() == 4


# --- word diff -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Always pass dates as YYYY-MM-DD.", "Always pass dates as ISO 8601, YYYY-MM-DD."),
        ("", "A new skill."),
        ("An old skill.", ""),
        ("same text", "same text"),
        ("a a a b", "a a b b"),
        ("line one\nline two", "line one\nline 2\nline three"),
    ],
)
def test_a_word_diff_rebuilds_both_texts_exactly(old, new):
    from skills.versions.diff import word_diff

    chunks = word_diff(old, new)

    assert "".join(c.text for c in chunks if c.op != "insert") == old
    assert "".join(c.text for c in chunks if c.op != "delete") == new


def test_a_word_diff_marks_only_the_changed_words_and_escapes_html():
    from skills.versions.diff import word_diff_html

    html = word_diff_html("Use <b>dates</b> as words.", "Use <b>dates</b> as ISO words.")

    assert html == "Use &lt;b&gt;dates&lt;/b&gt; as <ins>ISO </ins>words."
