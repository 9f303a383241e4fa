from __future__ import annotations

import pytest

from base.models import AuditEvent
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions import services as version_services
from skills.versions.models import PolicyVersion, Release
from tests import factories

pytestmark = pytest.mark.django_db


def test_list_revisions_filters_by_status_and_stays_in_the_keys_project(
    api, project, other_project, admin_key
):
    mine = factories.make_revision(project)
    rejected = factories.make_revision(project, slug="other")
    version_services.skill_revision_reject(revision=rejected, actor=None, reason="no")
    factories.make_revision(other_project)

    response = api.get("/api/v1/skills/revisions", key=admin_key, status="proposed")

    assert response.status_code == 200
    assert [item["id"] for item in response.json()["items"]] == [mine.pk]
    assert response.json()["items"][0]["skill"] == "iso-dates"


def test_an_ingest_key_may_not_decide(api, project, ingest_key):
    revision = factories.make_revision(project)

    response = api.post(f"/api/v1/skills/revisions/{revision.pk}/approve", {}, key=ingest_key)

    assert response.status_code == 403
    assert SkillRevision.objects.get(pk=revision.pk).status == RevisionStatus.PROPOSED


def test_no_key_answers_401(api, project):
    assert api.get("/api/v1/versions").status_code == 401


def test_approve_through_the_api_activates_a_new_version_attributed_to_the_key(
    api, project, admin_key
):
    revision = factories.make_revision(project)

    response = api.post(
        f"/api/v1/skills/revisions/{revision.pk}/approve", {"reason": "CI eval passed"},
        key=admin_key,
    )  # fmt: skip

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "approved"
    active = PolicyVersion.objects.get(project=project, status="active")
    assert active.number == 2
    release = Release.objects.get(to_version=active)
    assert release.actor_label.startswith("api-key:") and release.reason == "CI eval passed"
    assert AuditEvent.objects.filter(
        action="skill_revision.approve", actor_label=release.actor_label
    ).exists()


def test_approving_twice_answers_409_saying_who_acted_first(api, project, admin_key):
    revision = factories.make_revision(project)
    api.post(f"/api/v1/skills/revisions/{revision.pk}/approve", {}, key=admin_key)

    response = api.post(f"/api/v1/skills/revisions/{revision.pk}/approve", {}, key=admin_key)

    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert "already approved by api-key:" in response.json()["detail"]
    assert PolicyVersion.objects.filter(project=project).count() == 2


def test_reject_without_a_reason_answers_422_naming_the_field(api, project, admin_key):
    revision = factories.make_revision(project)

    response = api.post(
        f"/api/v1/skills/revisions/{revision.pk}/reject", {"reason": " "}, key=admin_key
    )

    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["reason"]
    assert SkillRevision.objects.get(pk=revision.pk).status == RevisionStatus.PROPOSED


def test_a_revision_of_another_project_is_not_found(api, project, other_project, admin_key):
    foreign = factories.make_revision(other_project)

    response = api.post(f"/api/v1/skills/revisions/{foreign.pk}/approve", {}, key=admin_key)

    assert response.status_code == 404
    assert SkillRevision.objects.get(pk=foreign.pk).status == RevisionStatus.PROPOSED


def test_edit_and_approve_in_one_call(api, project, admin_key):
    revision = factories.make_revision(project)

    response = api.post(
        f"/api/v1/skills/revisions/{revision.pk}/edit",
        {
            "name": "Use ISO 8601 dates",
            "description": "When a tool wants a date.",
            "instructions": "Pass YYYY-MM-DD.",
            "category": "common_mistakes",
            "approve": True,
        },
        key=admin_key,
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["status"], body["number"], body["author"], body["parent_id"]) == (
        "approved", 2, "human", revision.pk,
    )  # fmt: skip
    assert SkillRevision.objects.get(pk=revision.pk).status == RevisionStatus.SUPERSEDED


def test_edit_with_a_bad_category_answers_422_naming_it(api, project, admin_key):
    revision = factories.make_revision(project)

    response = api.post(
        f"/api/v1/skills/revisions/{revision.pk}/edit",
        {"name": "n", "description": "d", "instructions": "i", "category": "cooking"},
        key=admin_key,
    )

    assert response.status_code == 422
    assert "category" in {e["field"] for e in response.json()["errors"]}


def test_versions_list_detail_and_diff(api, project, admin_key):
    first = factories.make_revision(project)
    version_services.skill_revision_approve(revision=first, actor=None)
    second = factories.make_revision(
        project, instructions="Always pass dates as ISO 8601 YYYY-MM-DD."
    )
    version_services.skill_revision_approve(revision=second, actor=None)

    listing = api.get("/api/v1/versions", key=admin_key).json()
    detail = api.get("/api/v1/versions/3", key=admin_key).json()
    diff = api.get("/api/v1/versions/2/diff/3", key=admin_key).json()

    assert [(v["number"], v["status"]) for v in listing] == [
        (3, "active"), (2, "retired"), (1, "retired"),
    ]  # fmt: skip
    assert [r["id"] for r in detail["revisions"]] == [second.pk]
    assert diff["changed"][0]["skill"] == "iso-dates"
    chunks = diff["changed"][0]["fields"][0]["chunks"]
    assert {"op": "insert", "text": "ISO 8601 "} in chunks or any(
        c["op"] == "insert" and "ISO" in c["text"] for c in chunks
    )
    assert diff["added"] == [] and diff["removed"] == []


def test_promote_reject_and_roll_back_through_the_api(api, project, admin_key):
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://r/1", base_model="m", changelog="LoRA"
    )
    other = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://r/2", base_model="m", changelog="LoRA 2"
    )

    promoted = api.post(f"/api/v1/versions/{candidate.number}/promote", {}, key=admin_key)
    rejected = api.post(
        f"/api/v1/versions/{other.number}/reject", {"reason": "worse"}, key=admin_key
    )
    again = api.post(f"/api/v1/versions/{other.number}/promote", {}, key=admin_key)
    rolled = api.post("/api/v1/versions/1/rollback", {"reason": "adapter drifts"}, key=admin_key)

    assert promoted.status_code == 200 and promoted.json()["status"] == "active"
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert again.status_code == 409
    assert rolled.status_code == 200 and rolled.json()["status"] == "active"
    candidate.refresh_from_db()
    assert candidate.status == "retired" and candidate.rolled_back_at is not None


def test_rollback_without_a_reason_answers_422(api, project, admin_key):
    version_services.skill_revision_approve(revision=factories.make_revision(project), actor=None)

    response = api.post("/api/v1/versions/1/rollback", {}, key=admin_key)

    assert response.status_code == 422
    assert PolicyVersion.objects.get(project=project, status="active").number == 2


def test_unknown_version_answers_404(api, project, admin_key):
    assert api.get("/api/v1/versions/99", key=admin_key).status_code == 404
    assert api.get("/api/v1/versions/1/diff/99", key=admin_key).status_code == 404


def test_version_of_another_project_is_not_visible(api, project, other_project, admin_key):
    version_services.skill_revision_approve(
        revision=factories.make_revision(other_project), actor=None
    )

    assert api.get("/api/v1/versions/2", key=admin_key).status_code == 404
    assert factories.make_key  # keys are per project: the admin key is the first project's


def test_an_edit_may_keep_what_the_agent_skills_format_allows(api, project, admin_key):
    # Imported skills hold descriptions up to 1,024 characters and long bodies: an edit through
    # the API (and the review page's textarea) must be able to keep them.
    revision = factories.make_revision(project)
    long_description = "When a tool wants a date,\nand the user wrote it another way. " * 15
    assert 500 < len(long_description) <= 1024
    edit = {
        "name": "Use ISO 8601 dates",
        "description": long_description,
        "instructions": "Pass YYYY-MM-DD.\n" * 2000,
    }
    response = api.post(f"/api/v1/skills/revisions/{revision.pk}/edit", edit, key=admin_key)
    assert response.status_code == 201, response.content
    stored = SkillRevision.objects.get(pk=response.json()["id"])
    # Kept whole (only the surrounding whitespace is trimmed, as for every edit).
    assert (stored.description, stored.instructions) == (
        edit["description"].strip(),
        edit["instructions"].strip(),
    )

    too_long = {**edit, "description": "x" * 1025}
    response = api.post(f"/api/v1/skills/revisions/{stored.pk}/edit", too_long, key=admin_key)
    assert response.status_code == 422
    assert "description" in {e["field"] for e in response.json()["errors"]}
