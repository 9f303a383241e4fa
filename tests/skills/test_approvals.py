"""One-click approval links: GET shows, POST acts once, and every refusal changes nothing."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from base.errors import PermissionDenied
from base.models import Project
from base.services import membership_set
from incidents.models import Incident
from skills.approvals import links as approvals
from skills.approvals.models import ApprovalAction, ApprovalRequest
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, Release, VersionStatus
from skills.versions.services import (
    policy_version_create_candidate,
    policy_version_reject,
)
from tests import factories

pytestmark = pytest.mark.django_db


def make_link(action: str, addressee=None, **target) -> tuple[ApprovalRequest, str]:
    request, token = approvals.approval_request_create(action=action, addressee=addressee, **target)
    return request, f"/a/{token}"


@pytest.fixture
def reviewer(project):
    return factories.make_member(project, "reviewer", "rita")


@pytest.fixture
def revision(project):
    return factories.make_llm_revision(project)


def active_version(project: Project) -> PolicyVersion:
    return PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)


def assert_nothing_decided(revision: SkillRevision, request: ApprovalRequest) -> None:
    revision.refresh_from_db()
    request.refresh_from_db()
    assert revision.status == RevisionStatus.PROPOSED
    assert request.used_at is None and request.decided_by is None
    assert not Release.objects.filter(kind="approval").exists()


def assert_refused_and_unused(response, reason: str, request: ApprovalRequest) -> None:
    """The link answered 409 saying ``reason``, and is still unused."""
    assert response.status_code == 409
    assert reason in response.content.decode()
    request.refresh_from_db()
    assert request.used_at is None


# --- Showing and acting -------------------------------------------------------------------


def test_get_shows_the_skill_text_and_evidence_count_and_never_acts(
    client, api, project, ingest_key, reviewer
):
    api.post("/api/v1/incidents", factories.incident_payload("ev-1"), key=ingest_key)
    revision = factories.make_llm_revision(project, source_incidents=list(Incident.objects.all()))
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)

    first = client.get(url)
    second = client.get(url)  # a mail scanner's prefetch, then the person

    assert first.status_code == second.status_code == 200
    body = first.content.decode()
    assert "Normalise date arguments" in body
    assert "Convert relative dates like &#x27;last week&#x27;" in body
    assert '<span class="evidence-count">1</span>' in body
    assert "Approve as rita" in body
    assert_nothing_decided(revision, request)


def test_post_approves_through_the_decision_service_and_publishes_a_version(
    client, project, reviewer, revision
):
    before = active_version(project)
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)

    response = client.post(url)

    assert response.status_code == 200
    assert "Done: approved" in response.content.decode()
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    assert revision.decided_by == reviewer
    request.refresh_from_db()
    assert request.used_at is not None
    assert request.decided_by == reviewer
    assert request.outcome == "approved"
    now_active = active_version(project)
    assert now_active.number == before.number + 1
    assert list(now_active.revisions.all()) == [revision]
    assert Release.objects.get(to_version=now_active).kind == "approval"


def test_a_used_link_says_who_decided_and_when_and_changes_nothing(
    client, project, reviewer, revision
):
    _, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    client.post(url)
    versions = PolicyVersion.objects.count()

    again = client.post(url)
    shown = client.get(url)

    assert again.status_code == shown.status_code == 409
    text = again.content.decode()
    assert "already used: approved by rita at" in text
    assert "Nothing was changed." in text
    assert PolicyVersion.objects.count() == versions


def test_another_reviewers_link_after_the_decision_says_already_approved_by_whom(
    client, project, reviewer, revision
):
    other = factories.make_member(project, "reviewer", "otto")
    _, rita_url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    otto_request, otto_url = make_link(ApprovalAction.REJECT_REVISION, other, revision=revision)
    client.post(rita_url)

    response = client.post(otto_url, {"reason": "too late"})

    assert_refused_and_unused(response, "was already approved by rita at", otto_request)
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED and revision.decision_reason == ""


def test_an_expired_link_is_refused(client, project, reviewer, revision):
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    ApprovalRequest.objects.filter(pk=request.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )

    assert client.get(url).status_code == 410
    response = client.post(url)

    assert response.status_code == 410
    assert "This link expired at" in response.content.decode()
    assert_nothing_decided(revision, request)


def test_links_expire_after_the_projects_ttl(project, reviewer, revision):
    Project.objects.filter(pk=project.pk).update(approval_link_ttl_hours=5)
    revision.refresh_from_db()

    request, _ = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)

    lifetime = request.expires_at - request.created_at
    assert timedelta(hours=5) - timedelta(seconds=5) < lifetime <= timedelta(hours=5)


def test_a_tampered_or_unknown_token_is_refused(client, project, reviewer, revision):
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    tampered = url[:-1] + ("A" if url[-1] != "A" else "B")

    for path in (tampered, "/a/not-a-token", "/a/" + "x" * 300):
        response = client.post(path)
        assert response.status_code == 404
        assert "unknown, or it was altered" in response.content.decode()
    assert_nothing_decided(revision, request)


def test_only_the_hash_of_the_token_is_stored(project, reviewer, revision):
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    token = url.removeprefix("/a/")

    assert len(token) >= 40
    assert token not in request.token_hash
    assert not ApprovalRequest.objects.filter(token_hash=token).exists()


def test_a_link_for_a_revision_that_was_edited_since_is_refused(
    client, project, reviewer, revision
):
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    factories.supersede_by_edit(revision, factories.make_member(project, "reviewer", "eddie"))

    response = client.post(url)

    assert_refused_and_unused(response, "was already superseded by eddie", request)
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.SUPERSEDED


def test_a_promote_link_for_a_version_no_longer_a_candidate_is_refused(client, project):
    admin = factories.make_member(project, "admin", "ada")
    version = policy_version_create_candidate(
        project=project, adapter_ref="tinker://run/sampler_weights/a", base_model="m", changelog="c"
    )
    request, url = make_link(ApprovalAction.PROMOTE_VERSION, admin, version=version)
    policy_version_reject(version=version, actor=admin, reason="worse on eval")

    response = client.post(url)

    assert_refused_and_unused(response, f"v{version.number} is rejected", request)
    version.refresh_from_db()
    assert version.status == VersionStatus.REJECTED


def test_a_link_whose_addressee_lost_the_role_is_refused(client, project, reviewer, revision):
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    membership_set(project=project, user=reviewer, role="viewer")

    response = client.post(url)

    assert response.status_code == 403
    assert "rita no longer has the reviewer role" in response.content.decode()
    assert_nothing_decided(revision, request)


def test_links_are_only_made_for_members_with_the_right_role(project, revision):
    viewer = factories.make_member(project, "viewer", "vic")
    reviewer = factories.make_member(project, "reviewer", "rick")
    version = policy_version_create_candidate(
        project=project, adapter_ref="a", base_model="m", changelog="c"
    )

    with pytest.raises(PermissionDenied):
        approvals.approval_request_create(
            action=ApprovalAction.APPROVE_REVISION, revision=revision, addressee=viewer
        )
    with pytest.raises(PermissionDenied):
        approvals.approval_request_create(
            action=ApprovalAction.PROMOTE_VERSION, version=version, addressee=reviewer
        )
    assert not ApprovalRequest.objects.exists()


# --- Logins -------------------------------------------------------------------------------


def test_a_project_that_requires_login_refuses_strangers_and_other_members(
    client, project, reviewer, revision
):
    Project.objects.filter(pk=project.pk).update(approval_links_require_login=True)
    request, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)

    get = client.get(url)
    assert get.status_code == 302 and get["Location"].startswith("/login/")
    anonymous = client.post(url)
    assert anonymous.status_code == 403
    assert "requires you to log in as rita" in anonymous.content.decode()

    client.force_login(factories.make_member(project, "reviewer", "otto"))
    other = client.post(url)
    assert other.status_code == 403
    assert "This link was sent to rita; you are logged in as otto." in other.content.decode()
    assert_nothing_decided(revision, request)

    client.force_login(reviewer)
    assert client.post(url).status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED


def test_a_channel_link_acts_as_whoever_logs_in_with_the_role(client, project, revision):
    request, url = make_link(ApprovalAction.APPROVE_REVISION, None, revision=revision)

    assert client.get(url).status_code == 302  # to the login page
    assert client.post(url).status_code == 403
    client.force_login(factories.make_member(project, "viewer", "vic"))
    refused = client.post(url)
    assert refused.status_code == 403
    assert "vic no longer has the reviewer role" in refused.content.decode()
    assert_nothing_decided(revision, request)

    rick = factories.make_member(project, "reviewer", "rick")
    client.force_login(rick)
    assert client.post(url).status_code == 200
    request.refresh_from_db()
    assert request.decided_by == rick
    revision.refresh_from_db()
    assert revision.decided_by == rick


# --- Reject, promote, second approver ------------------------------------------------------


def test_a_reject_link_needs_a_reason_and_stays_unused_without_one(
    client, project, reviewer, revision
):
    request, url = make_link(ApprovalAction.REJECT_REVISION, reviewer, revision=revision)

    missing = client.post(url, {"reason": "  "})

    assert missing.status_code == 422
    assert "Give a reason." in missing.content.decode()
    assert_nothing_decided(revision, request)

    done = client.post(url, {"reason": "Dates are already ISO upstream."})

    assert done.status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.REJECTED
    assert revision.decision_reason == "Dates are already ISO upstream."
    request.refresh_from_db()
    assert request.outcome == "rejected"


def test_a_promote_link_shows_the_diff_and_makes_the_candidate_active(client, project):
    admin = factories.make_member(project, "admin", "ada")
    old_active = active_version(project)
    version = policy_version_create_candidate(
        project=project,
        adapter_ref="tinker://run-1/sampler_weights/final",
        base_model="Qwen/Qwen3-8B",
        changelog="LoRA trained on 412 trajectories.",
    )
    _, url = make_link(ApprovalAction.PROMOTE_VERSION, admin, version=version)

    page = client.get(url).content.decode()
    assert "tinker://run-1/sampler_weights/final" in page
    assert "LoRA trained on 412 trajectories." in page

    assert client.post(url).status_code == 200
    version.refresh_from_db()
    assert version.status == VersionStatus.ACTIVE
    old_active.refresh_from_db()
    assert old_active.status == VersionStatus.RETIRED
    assert Release.objects.get(to_version=version).kind == "promotion"


def test_with_a_second_approver_required_two_links_of_two_reviewers_are_needed(
    client, project, reviewer
):
    Project.objects.filter(pk=project.pk).update(require_second_approver=True)
    revision = factories.make_llm_revision(Project.objects.get(pk=project.pk))
    other = factories.make_member(project, "reviewer", "otto")
    first, first_url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    _, second_url = make_link(ApprovalAction.APPROVE_REVISION, other, revision=revision)

    assert client.post(first_url).status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.PROPOSED
    assert revision.first_approved_by == reviewer
    first.refresh_from_db()
    assert first.outcome == "first approval"

    assert client.post(second_url).status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    assert revision.decided_by == other


# --- Concurrency ----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_simultaneous_uses_of_one_link_act_once():
    project = factories.make_project()
    reviewer = factories.make_member(project, "reviewer")
    revision = factories.make_llm_revision(project)
    _, url = make_link(ApprovalAction.APPROVE_REVISION, reviewer, revision=revision)
    token = url.removeprefix("/a/")
    barrier = threading.Barrier(2)
    results: list[str] = []

    def use() -> None:
        try:
            barrier.wait(timeout=10)
            approvals.approval_link_act(token=token)
            results.append("acted")
        except approvals.LinkRefused as exc:
            results.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=use) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(results) in (["acted", "used"], ["acted", "changed"])
    assert Release.objects.filter(project=project, kind="approval").count() == 1
    assert ApprovalRequest.objects.get().used_at is not None
