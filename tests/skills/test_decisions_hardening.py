"""Issue 21 (hardening), items 3, 4, 5 and 13: decisions on skills and versions are never wrong.

Every test goes through the public interface (the API, the dashboard pages, approval links) and
checks the answer and what agents now run with."""

from __future__ import annotations

import json
import threading

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from base.models import AuditEvent, Project, Role
from skills.approvals import links as approvals
from skills.approvals.models import ApprovalAction
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, Release, VersionStatus
from tests import factories

pytestmark = pytest.mark.django_db


def page(name: str, project: Project, **kwargs) -> str:
    return reverse(f"skills:{name}", kwargs={"project_slug": project.slug, **kwargs})


def revision_status(revision: SkillRevision) -> str:
    return SkillRevision.objects.get(pk=revision.pk).status


def active(project: Project) -> PolicyVersion:
    return PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)


def live_instructions(api, project: Project) -> dict[str, str]:
    """What agents run with now, per skill slug, as the runtime API answers it."""
    key = factories.make_key(project, scopes=["runtime"], name="agent")
    response = api.get("/api/v1/runtime/policy", key=key)
    assert response.status_code == 200, response.content
    return {skill["slug"]: skill["instructions"] for skill in response.json()["skills"]}


def approve(api, key: str, revision: SkillRevision, reason: str = ""):
    return api.post(f"/api/v1/skills/revisions/{revision.pk}/approve", {"reason": reason}, key=key)


def member_client(
    project: Project, role: str, username: str | None = None
) -> tuple[Client, object]:
    user = factories.make_member(project, role, username)
    client = Client()
    client.force_login(user)
    return client, user


@pytest.fixture(autouse=True)
def _fresh_policy(fresh_runtime_caches):
    """Every test reads the runtime policy from a cold cache."""


# --- 3. An older proposal can no longer revert the live skill -------------------------------


def test_approving_a_newer_revision_supersedes_the_older_proposals(api, project, admin_key):
    older = factories.make_revision(project, instructions="Old text.")  # r1
    newer = factories.make_revision(project, instructions="New text.")  # r2

    assert approve(api, admin_key, newer).status_code == 200

    assert revision_status(older) == RevisionStatus.SUPERSEDED
    response = approve(api, admin_key, older)
    assert response.status_code == 409
    assert "iso-dates r1 was already superseded" in response.json()["detail"]
    assert "r2" in response.json()["detail"]
    assert live_instructions(api, project) == {"iso-dates": "New text."}
    listed = api.get("/api/v1/skills/revisions", key=admin_key, status="proposed").json()
    assert listed["items"] == []


def test_an_older_proposal_cannot_be_approved_from_the_dashboard_or_edited(api, project):
    older = factories.make_revision(project, instructions="Old text.")
    newer = factories.make_revision(project, instructions="New text.")
    client, _ = member_client(project, Role.REVIEWER)
    assert client.post(page("revision_approve", project, revision_id=newer.pk)).status_code == 302

    approval = client.post(
        page("revision_approve", project, revision_id=older.pk), HTTP_HX_REQUEST="true"
    )
    edit = client.post(
        page("revision_edit", project, revision_id=older.pk),
        {"name": "n", "description": "d", "instructions": "Old, edited.", "category": "general"},
        HTTP_HX_REQUEST="true",
    )

    assert approval.status_code == 409 and "superseded" in approval.content.decode()
    assert edit.status_code == 409
    assert live_instructions(api, project) == {"iso-dates": "New text."}
    assert SkillRevision.objects.filter(skill=older.skill).count() == 2  # no edit was saved


def test_a_still_valid_approval_link_for_an_older_proposal_is_refused(api, project, admin_key):
    reviewer = factories.make_member(project, Role.REVIEWER, "rita")
    older = factories.make_revision(project, instructions="Old text.")
    request, token = approvals.approval_request_create(
        action=ApprovalAction.APPROVE_REVISION, addressee=reviewer, revision=older
    )
    newer = factories.make_revision(project, instructions="New text.")
    assert approve(api, admin_key, newer).status_code == 200

    response = Client().post(f"/a/{token}")

    assert response.status_code == 409
    assert "superseded" in response.content.decode()
    request.refresh_from_db()
    assert request.used_at is None
    assert live_instructions(api, project) == {"iso-dates": "New text."}


def test_an_older_proposal_left_proposed_is_refused_naming_the_newer_revision(
    api, project, admin_key
):
    """Proposals that stayed PROPOSED before this fix (the database has some) are refused by the
    deciding service itself, whatever the entry point."""
    older = factories.make_revision(project, instructions="Old text.")
    newer = factories.make_revision(project, instructions="New text.")
    assert approve(api, admin_key, newer).status_code == 200
    SkillRevision.objects.filter(pk=older.pk).update(status=RevisionStatus.PROPOSED)
    releases = Release.objects.filter(project=project).count()

    response = approve(api, admin_key, older)

    assert response.status_code == 409
    assert "r2 is newer and was approved" in response.json()["detail"]
    assert revision_status(older) == RevisionStatus.PROPOSED
    assert Release.objects.filter(project=project).count() == releases
    assert live_instructions(api, project) == {"iso-dates": "New text."}


def test_a_newer_proposal_stays_open_when_an_older_one_is_approved(api, project, admin_key):
    older = factories.make_revision(project, instructions="Old text.")
    newer = factories.make_revision(project, instructions="New text.")

    assert approve(api, admin_key, older).status_code == 200
    assert revision_status(newer) == RevisionStatus.PROPOSED
    assert approve(api, admin_key, newer).status_code == 200

    assert live_instructions(api, project) == {"iso-dates": "New text."}
    assert revision_status(older) == RevisionStatus.SUPERSEDED


# --- 4. The two-person rule compares people, not labels ---------------------------------------


def two_person_project() -> Project:
    return factories.make_project(require_second_approver=True)


def dashboard_key(client: Client, project: Project, scopes: list[str]) -> str:
    """An API key made on the dashboard's keys page, as an admin does: its owner is the admin."""
    response = client.post(
        reverse("project:api_keys_create", kwargs={"project_slug": project.slug}),
        {"name": "my ci", "scopes": scopes},
    )
    assert response.status_code == 201, response.content
    return response.context["issued"].secret


def test_a_dashboard_approval_and_the_same_persons_key_are_one_reviewer(api):
    project = two_person_project()
    client, alice = member_client(project, Role.ADMIN, "alice")
    key = dashboard_key(client, project, ["admin"])
    revision = factories.make_revision(project)
    assert (
        client.post(page("revision_approve", project, revision_id=revision.pk)).status_code == 302
    )
    assert revision_status(revision) == RevisionStatus.PROPOSED  # the first approval

    response = approve(api, key, revision)

    assert response.status_code == 409
    assert "same person (alice)" in response.json()["detail"]
    assert "second, different reviewer" in response.json()["detail"]
    assert revision_status(revision) == RevisionStatus.PROPOSED
    assert active(project).number == 1


def test_a_keys_first_approval_and_its_owner_on_the_dashboard_are_one_reviewer(api):
    project = two_person_project()
    client, _ = member_client(project, Role.ADMIN, "alice")
    key = dashboard_key(client, project, ["admin"])
    revision = factories.make_revision(project)
    assert approve(api, key, revision).status_code == 200  # the first approval

    response = client.post(
        page("revision_approve", project, revision_id=revision.pk), HTTP_HX_REQUEST="true"
    )

    assert response.status_code == 409
    assert "same person (alice)" in response.content.decode()
    assert revision_status(revision) == RevisionStatus.PROPOSED
    assert active(project).number == 1
    shown = client.get(page("revision_detail", project, revision_id=revision.pk)).content.decode()
    assert "(alice's key); a second, different person must approve" in shown


def test_a_key_of_another_person_is_a_second_reviewer(api):
    project = two_person_project()
    alice_client, _ = member_client(project, Role.REVIEWER, "alice")
    bob_client, _ = member_client(project, Role.ADMIN, "bob")
    bobs_key = dashboard_key(bob_client, project, ["admin"])
    revision = factories.make_revision(project, instructions="Reviewed twice.")
    alice_client.post(page("revision_approve", project, revision_id=revision.pk))

    response = approve(api, bobs_key, revision)

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "approved"
    assert live_instructions(api, project) == {"iso-dates": "Reviewed twice."}


def test_a_key_with_no_owner_cannot_take_part_in_a_two_person_approval(api):
    """A key made by a command has no owner: nobody can say which person used it, so in a
    project that needs two reviewers its approval counts for no one, first or second."""
    project = two_person_project()
    ownerless = factories.make_key(project, scopes=["admin"])
    client, _ = member_client(project, Role.REVIEWER, "alice")
    first = factories.make_revision(project, slug="one")
    second = factories.make_revision(project, slug="two")
    client.post(page("revision_approve", project, revision_id=second.pk))

    as_first = approve(api, ownerless, first)
    as_second = approve(api, ownerless, second)

    for response in (as_first, as_second):
        assert response.status_code == 409
        assert "has no owner" in response.json()["detail"]
    assert revision_status(first) == revision_status(second) == RevisionStatus.PROPOSED
    assert not SkillRevision.objects.get(pk=first.pk).first_approved_by_label
    assert active(project).number == 1


def test_a_key_with_no_owner_still_approves_alone_where_one_reviewer_is_enough(api, project):
    revision = factories.make_revision(project)

    response = approve(api, factories.make_key(project, scopes=["admin"]), revision)

    assert response.status_code == 200
    assert response.json()["status"] == "approved"


# --- 5. After a rollback the statuses say what is live ----------------------------------------


def test_after_a_rollback_the_live_revision_reads_approved_and_the_other_rolled_back(
    api, project, admin_key
):
    first = factories.make_revision(project, instructions="First text.")
    assert approve(api, admin_key, first).status_code == 200  # v2
    second = factories.make_revision(project, instructions="Second text.")
    assert approve(api, admin_key, second).status_code == 200  # v3
    dropped = factories.make_revision(project, slug="be-polite")
    assert approve(api, admin_key, dropped).status_code == 200  # v4

    response = api.post(
        "/api/v1/versions/2/rollback", {"reason": "v3 broke refunds"}, key=admin_key
    )

    assert response.status_code == 200, response.content
    revisions = {
        (r["skill"], r["number"]): r
        for r in api.get("/api/v1/skills/revisions", key=admin_key).json()["items"]
    }
    live = revisions[("iso-dates", 1)]
    assert (live["status"], live["rolled_back_at"]) == ("approved", None)
    for key in (("iso-dates", 2), ("be-polite", 1)):
        assert revisions[key]["status"] == "superseded"
        assert revisions[key]["rolled_back_at"] is not None
    assert live_instructions(api, project) == {"iso-dates": "First text."}
    approved = api.get("/api/v1/skills/revisions", key=admin_key, status="approved").json()
    assert [r["id"] for r in approved["items"]] == [first.pk]


def test_rolling_forward_again_makes_the_rolled_back_revision_live_and_approved(
    api, project, admin_key
):
    first = factories.make_revision(project, instructions="First text.")
    approve(api, admin_key, first)  # v2
    second = factories.make_revision(project, instructions="Second text.")
    approve(api, admin_key, second)  # v3
    api.post("/api/v1/versions/2/rollback", {"reason": "broke"}, key=admin_key)

    response = api.post("/api/v1/versions/3/rollback", {"reason": "it was fine"}, key=admin_key)

    assert response.status_code == 200
    second.refresh_from_db()
    first.refresh_from_db()
    assert (second.status, second.rolled_back_at) == (RevisionStatus.APPROVED, None)
    assert first.status == RevisionStatus.SUPERSEDED
    assert live_instructions(api, project) == {"iso-dates": "Second text."}


def test_the_library_page_shows_the_rolled_back_revision_as_rolled_back(api, project, admin_key):
    approve(api, admin_key, factories.make_revision(project, instructions="First."))
    approve(api, admin_key, factories.make_revision(project, instructions="Second."))
    api.post("/api/v1/versions/2/rollback", {"reason": "broke"}, key=admin_key)
    client, _ = member_client(project, Role.VIEWER)

    response = client.get(page("skill_library", project))

    skill = response.context["skills"][0]
    rows = {r.number: r for r in skill.revisions.all()}
    assert rows[1].status == RevisionStatus.APPROVED and rows[1].rolled_back_at is None
    assert rows[2].status == RevisionStatus.SUPERSEDED and rows[2].rolled_back_at is not None
    assert "rolled back" in response.content.decode()


# --- 13. Composing candidates, and promotions that race ---------------------------------------


def compose(api, key: str, **body):
    return api.post("/api/v1/versions", body, key=key)


def test_an_admin_key_composes_a_candidate_from_chosen_revisions_and_an_adapter(
    api, project, admin_key
):
    first = factories.make_revision(project, instructions="First text.")
    approve(api, admin_key, first)  # v2
    approve(api, admin_key, factories.make_revision(project, instructions="Second text."))  # v3
    other = factories.make_revision(project, slug="be-polite")
    approve(api, admin_key, other)  # v4

    response = compose(
        api, admin_key, revisions=[first.pk], adapter_ref="tinker://run/7", base_model="qwen3-8b",
        changelog="Back to the first date skill, with run 7's adapter.",
    )  # fmt: skip

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["number"], body["status"], body["parent"]) == (5, "candidate", 4)
    assert (body["adapter_ref"], body["base_model"]) == ("tinker://run/7", "qwen3-8b")
    assert [r["id"] for r in body["revisions"]] == [first.pk]
    assert active(project).number == 4  # nothing changed for agents yet
    assert AuditEvent.objects.filter(
        action="policy_version.create_candidate", actor_label__startswith="api-key:"
    ).exists()
    diff = api.get("/api/v1/versions/4/diff/5", key=admin_key).json()
    assert diff["adapter"] == {"from": "", "to": "tinker://run/7"}
    assert [(c["from"]["number"], c["to"]["number"]) for c in diff["changed"]] == [(2, 1)]
    assert [r["skill"] for r in diff["removed"]] == ["be-polite"]

    promoted = api.post("/api/v1/versions/5/promote", {"reason": "eval"}, key=admin_key)

    assert promoted.status_code == 200, promoted.content
    assert promoted.json()["replaced"] == 4
    assert live_instructions(api, project) == {"iso-dates": "First text."}
    first.refresh_from_db()
    other.refresh_from_db()
    assert first.status == RevisionStatus.APPROVED
    assert other.status == RevisionStatus.SUPERSEDED


def test_composing_without_revisions_or_adapter_keeps_the_active_ones(api, project, admin_key):
    revision = factories.make_revision(project)
    approve(api, admin_key, revision)  # v2

    response = compose(api, admin_key, adapter_ref="tinker://run/8")

    assert response.status_code == 201, response.content
    assert [r["id"] for r in response.json()["revisions"]] == [revision.pk]
    assert response.json()["adapter_ref"] == "tinker://run/8"


@pytest.mark.parametrize(
    "which", ["proposed", "rejected", "foreign", "unknown", "two_of_one_skill"]
)
def test_composing_refuses_revisions_that_were_never_approved_or_are_not_ours(
    api, project, other_project, admin_key, which
):
    first = factories.make_revision(project)
    approve(api, admin_key, first)
    proposed = factories.make_revision(project, slug="pending")
    rejected = factories.make_revision(project, slug="nope")
    api.post(f"/api/v1/skills/revisions/{rejected.pk}/reject", {"reason": "no"}, key=admin_key)
    foreign = factories.make_revision(other_project)
    second = factories.make_revision(project, instructions="Second.")
    approve(api, admin_key, second)
    chosen = {
        "proposed": [proposed.pk],
        "rejected": [rejected.pk],
        "foreign": [foreign.pk],
        "unknown": [10**9],
        "two_of_one_skill": [first.pk, second.pk],
    }[which]
    versions = PolicyVersion.objects.count()

    response = compose(api, admin_key, revisions=chosen, adapter_ref="")

    assert response.status_code == 422, response.content
    assert response.json()["errors"][0]["field"] == "revisions"
    assert PolicyVersion.objects.count() == versions


def test_only_an_admin_key_composes(api, project):
    key = factories.make_key(project, scopes=["ingest", "runtime"])

    response = compose(api, key, adapter_ref="x")

    assert response.status_code == 403
    assert PolicyVersion.objects.filter(project=project).count() == 1


def test_an_admin_composes_a_candidate_on_the_dashboard(api, project, admin_key):
    first = factories.make_revision(project, instructions="First text.")
    approve(api, admin_key, first)  # v2
    approve(api, admin_key, factories.make_revision(project, instructions="Second text."))  # v3
    client, admin = member_client(project, Role.ADMIN, "ada")

    form = client.get(page("version_compose", project))
    response = client.post(
        page("version_compose", project),
        {
            f"skill-{first.skill_id}": str(first.pk),
            "adapter_ref": "tinker://run/9",
            "base_model": "qwen3-8b",
            "changelog": "First text again.",
        },
    )

    assert form.status_code == 200
    assert "iso-dates" in form.content.decode() and "r1" in form.content.decode()
    assert response.status_code == 302
    candidate = PolicyVersion.objects.get(project=project, number=4)
    assert response["Location"] == page("version_detail", project, number=4)
    assert candidate.status == VersionStatus.CANDIDATE and candidate.created_by == admin
    assert list(candidate.revisions.all()) == [first]
    assert candidate.adapter_ref == "tinker://run/9"


def test_the_compose_page_is_for_admins_only(project):
    client, _ = member_client(project, Role.REVIEWER)

    assert client.get(page("version_compose", project)).status_code == 403
    assert client.post(page("version_compose", project), {"adapter_ref": "x"}).status_code == 403
    assert PolicyVersion.objects.filter(project=project).count() == 1


def test_a_refused_composition_keeps_the_form_and_says_why(api, project, admin_key):
    proposed = factories.make_revision(project)
    client, _ = member_client(project, Role.ADMIN)

    response = client.post(
        page("version_compose", project),
        {f"skill-{proposed.skill_id}": str(proposed.pk), "adapter_ref": "tinker://run/1"},
    )

    assert response.status_code == 422
    assert "was never approved" in response.content.decode()
    assert 'value="tinker://run/1"' in response.content.decode()
    assert PolicyVersion.objects.filter(project=project).count() == 1


def test_promoting_a_candidate_built_on_a_replaced_version_is_refused_naming_it(
    api, project, admin_key
):
    one = compose(api, admin_key, adapter_ref="tinker://run/1").json()["number"]  # v2
    two = compose(api, admin_key, adapter_ref="tinker://run/2").json()["number"]  # v3
    assert api.post(f"/api/v1/versions/{one}/promote", {}, key=admin_key).status_code == 200

    response = api.post(f"/api/v1/versions/{two}/promote", {}, key=admin_key)

    assert response.status_code == 409
    detail = response.json()["detail"]
    assert f"v{two} was built on v1, but v{one} is active now" in detail
    assert f"would replace v{one}" in detail
    assert active(project).number == one
    assert PolicyVersion.objects.get(project=project, number=two).status == "candidate"

    confirmed = api.post(f"/api/v1/versions/{two}/promote", {"replaces": one}, key=admin_key)

    assert confirmed.status_code == 200, confirmed.content
    assert confirmed.json()["replaced"] == one
    assert active(project).number == two


def test_promoting_with_a_stale_expectation_is_refused(api, project, admin_key):
    candidate = compose(api, admin_key, adapter_ref="tinker://run/1").json()["number"]

    response = api.post(f"/api/v1/versions/{candidate}/promote", {"replaces": 7}, key=admin_key)

    assert response.status_code == 409
    assert "v1 is active, not v7" in response.json()["detail"]
    assert active(project).number == 1


def test_the_promote_confirmation_tells_the_second_admin_what_changed(api, project, admin_key):
    one = compose(api, admin_key, adapter_ref="tinker://run/1").json()["number"]  # v2
    two = compose(api, admin_key, adapter_ref="tinker://run/2").json()["number"]  # v3
    first_admin, _ = member_client(project, Role.ADMIN)
    second_admin, _ = member_client(project, Role.ADMIN)
    confirm = second_admin.get(page("version_promote", project, number=two))
    assert 'name="replaces" value="1"' in confirm.content.decode()
    assert first_admin.post(page("version_promote", project, number=one)).status_code == 302

    refused = second_admin.post(page("version_promote", project, number=two), {"replaces": "1"})

    assert refused.status_code == 409
    assert f"v{one} is active" in refused.content.decode()
    assert f'name="replaces" value="{one}"' in refused.content.decode()
    assert active(project).number == one

    again = second_admin.post(page("version_promote", project, number=two), {"replaces": str(one)})

    assert again.status_code == 302
    assert active(project).number == two


def test_a_promote_link_for_a_candidate_whose_base_was_replaced_is_refused(api, project, admin_key):
    admin = factories.make_member(project, Role.ADMIN, "ada")
    one = PolicyVersion.objects.get(pk=compose(api, admin_key, adapter_ref="a").json()["id"])
    two = PolicyVersion.objects.get(pk=compose(api, admin_key, adapter_ref="b").json()["id"])
    _, token = approvals.approval_request_create(
        action=ApprovalAction.PROMOTE_VERSION, addressee=admin, version=two
    )
    api.post(f"/api/v1/versions/{one.number}/promote", {}, key=admin_key)

    response = Client().post(f"/a/{token}")

    assert response.status_code == 409
    assert f"would replace v{one.number}" in response.content.decode()
    assert active(project) == one


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_promotions_leave_one_active_version_and_tell_the_loser():
    """Two admins compose a candidate each and promote it at the same instant, through the API,
    each request on its own database connection."""
    project = factories.make_project()
    keys = [factories.make_key(project, scopes=["admin"], name=f"ci {i}") for i in range(2)]
    barrier = threading.Barrier(2)
    answers: list = [None, None]

    def admin(i: int) -> None:
        client = Client()
        headers = {"HTTP_AUTHORIZATION": f"Bearer {keys[i]}"}
        post = lambda path, body: client.post(  # noqa: E731
            path, json.dumps(body), content_type="application/json", **headers
        )
        try:
            barrier.wait(timeout=10)
            composed = post("/api/v1/versions", {"adapter_ref": f"tinker://run/{i}"})
            number = composed.json()["number"]
            barrier.wait(timeout=10)
            promoted = post(f"/api/v1/versions/{number}/promote", {"reason": f"run {i}"})
            answers[i] = (number, promoted.status_code, promoted.json())
        finally:
            connection.close()

    threads = [threading.Thread(target=admin, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    numbers = sorted(PolicyVersion.objects.filter(project=project).values_list("number", flat=True))
    assert numbers == [1, 2, 3]
    assert sorted(a[1] for a in answers) == [200, 409], answers
    winner = next(a for a in answers if a[1] == 200)
    loser = next(a for a in answers if a[1] == 409)
    assert winner[2]["replaced"] == 1
    assert f"v{winner[0]} is active now" in loser[2]["detail"]
    assert f"would replace v{winner[0]}" in loser[2]["detail"]
    assert PolicyVersion.objects.filter(project=project, status="active").count() == 1
    assert active(project).number == winner[0]
    assert PolicyVersion.objects.get(project=project, number=loser[0]).status == "candidate"
    assert Release.objects.filter(project=project, kind="promotion").count() == 1


def test_the_compose_page_issues_a_fixed_number_of_queries(api, project, admin_key):
    from django.db import connection as default_connection
    from django.test.utils import CaptureQueriesContext

    client, _ = member_client(project, Role.ADMIN)

    def queries() -> int:
        with CaptureQueriesContext(default_connection) as captured:
            assert client.get(page("version_compose", project)).status_code == 200
        return len(captured)

    approve(api, admin_key, factories.make_revision(project, slug="first"))
    client.get(page("version_compose", project))  # warm the session
    few = queries()
    for i in range(5):
        approve(api, admin_key, factories.make_revision(project, slug=f"more-{i}"))
        approve(api, admin_key, factories.make_revision(project, slug=f"more-{i}", name=f"v{i}"))
    compose(api, admin_key, adapter_ref="tinker://run/1")

    assert queries() == few
