from __future__ import annotations

import pytest
from django.urls import reverse

from base.models import Role
from incidents.models import Incident
from skills.library import services as library_services
from skills.library.models import Origin, RevisionStatus, SkillRevision
from skills.versions import services as version_services
from skills.versions.models import PolicyVersion, Release
from tests import factories

pytestmark = pytest.mark.django_db


def ingest(api, key, client_id: str, **overrides) -> Incident:
    response = api.post(
        "/api/v1/incidents", factories.incident_payload(client_id, **overrides), key=key
    )
    assert response.status_code == 202, response.content
    return Incident.objects.get(pk=response.json()["id"])


def propose(project, slug="iso-dates", incidents=(), **overrides) -> SkillRevision:
    fields = {
        "name": "Use ISO dates",
        "description": "When a tool wants a date.",
        "instructions": "Always pass dates as YYYY-MM-DD.",
        "origin": Origin.DEMO_FIXTURE,
        "diagnosis": "The agent passed 'last week' where the tool wants an ISO date.",
    }
    fields.update(overrides)
    return library_services.skill_revision_propose(
        project=project,
        draft=library_services.RevisionDraft(
            slug=slug,
            source_incidents=list(incidents),
            source_groups=list({i.group for i in incidents}),
            **fields,
        ),
    )


def url(name: str, project, **kwargs) -> str:
    return reverse(f"skills:{name}", kwargs={"project_slug": project.slug, **kwargs})


@pytest.fixture
def reviewer_client(client, project):
    client.force_login(factories.make_member(project, Role.REVIEWER))
    return client


@pytest.fixture
def admin_client(client, project):
    client.force_login(factories.make_member(project, Role.ADMIN))
    return client


@pytest.fixture
def viewer_client(client, project):
    client.force_login(factories.make_member(project, Role.VIEWER))
    return client


# --- review queue ----------------------------------------------------------------------------


def test_the_queue_lists_proposals_most_incidents_first(api, ingest_key, project, reviewer_client):
    small = propose(project, "small", [ingest(api, ingest_key, "a-1", kind="timeout")])
    big_incidents = [ingest(api, ingest_key, f"b-{i}") for i in range(3)]
    big = propose(project, "big", big_incidents)
    decided = propose(project, "decided")
    version_services.skill_revision_reject(revision=decided, actor=None, reason="no")

    response = reviewer_client.get(url("review_queue", project))

    assert response.status_code == 200
    queue = response.context["queue"]
    assert [r.pk for r in queue] == [big.pk, small.pk]
    assert queue[0].impact_events == 3
    assert b"data-review" in response.content


def test_the_home_page_redirects_to_the_review_queue(reviewer_client, project):
    response = reviewer_client.get("/")

    assert response.status_code == 302
    assert response["Location"] == url("review_queue", project)


def test_queue_filters_narrow_by_category_and_search(project, reviewer_client):
    propose(project, "iso-dates", category="common_mistakes")
    other = propose(project, "be-polite", name="Be polite", category="communication")

    by_category = reviewer_client.get(url("review_queue", project), {"category": "communication"})
    by_search = reviewer_client.get(url("review_queue", project), {"q": "polite"})

    assert [r.pk for r in by_category.context["queue"]] == [other.pk]
    assert [r.pk for r in by_search.context["queue"]] == [other.pk]


def test_an_htmx_filter_returns_only_the_queue_partial(project, reviewer_client):
    propose(project)

    response = reviewer_client.get(url("review_queue", project), HTTP_HX_REQUEST="true",
                                   HTTP_HX_TARGET="queue")  # fmt: skip

    body = response.content.decode()
    assert body.lstrip().startswith('<section id="queue"')
    assert "<html" not in body


def test_opening_a_proposal_with_htmx_returns_the_detail_panel_only(project, reviewer_client):
    revision = propose(project)

    response = reviewer_client.get(
        url("revision_detail", project, revision_id=revision.pk),
        HTTP_HX_REQUEST="true",
        HTTP_HX_TARGET="detail",
    )

    body = response.content.decode()
    assert body.lstrip().startswith('<section id="detail"')
    assert 'id="approve-form"' in body


def test_the_proposal_page_shows_evidence_as_a_conversation_with_redactions_marked(
    api, ingest_key, project, reviewer_client
):
    payload_messages = factories.incident_payload()["messages"]
    payload_messages[0]["content"] = "Where is my order? Mail me at jane.doe@example.com"
    incident = ingest(api, ingest_key, "ev-1", messages=payload_messages)
    revision = propose(project, incidents=[incident])

    response = reviewer_client.get(url("revision_detail", project, revision_id=revision.pk))

    body = response.content.decode()
    assert '<span class="redacted" title="Redacted email">[REDACTED:email]</span>' in body
    assert "jane.doe@example.com" not in body
    assert 'class="error-box"' in body and "search_orders: invalid value" in body
    assert "→ <code>search_orders(" in body
    assert "msg-tool msg-error" in body
    assert "Demo fixture (not written by a live LLM)" in body
    assert "The agent passed" in body  # the diagnosis
    assert "New skill (nothing live yet)" in body


def test_the_proposal_shows_a_word_diff_against_the_live_revision(project, reviewer_client):
    live = propose(project)
    version_services.skill_revision_approve(revision=live, actor=None)
    revision = propose(project, instructions="Always pass dates as ISO 8601, YYYY-MM-DD.")

    response = reviewer_client.get(url("revision_detail", project, revision_id=revision.pk))

    body = response.content.decode()
    assert "Changes against the live revision r1" in body
    assert "<ins>" in body and "ISO" in body


def test_a_reviewer_approves_from_the_page(project, reviewer_client):
    revision = propose(project)

    response = reviewer_client.post(url("revision_approve", project, revision_id=revision.pk))

    assert response.status_code == 302
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    assert PolicyVersion.objects.get(project=project, status="active").number == 2


def test_an_htmx_approval_answers_the_new_panel_and_refreshes_the_queue(project, reviewer_client):
    revision = propose(project)

    response = reviewer_client.post(
        url("revision_approve", project, revision_id=revision.pk), HTTP_HX_REQUEST="true"
    )

    assert response.status_code == 200
    assert response["HX-Trigger"] == "queue-changed"
    html = response.content.decode()
    # The success message is in the swapped panel itself, not saved for the next page; the
    # panel says the revision is live and links the version its approval made.
    assert f"Approved {revision.skill.slug} r{revision.number}: it is live." in html
    assert "New skill (nothing live yet)" not in html
    assert f"/p/{project.slug}/versions/2/" in html and "Live since" in html
    page = reviewer_client.get(url("review_queue", project)).content.decode()
    assert "it is live." not in page  # shown once


def test_approving_what_someone_else_approved_answers_409_naming_them(project, reviewer_client):
    revision = propose(project)
    first = factories.make_member(project, Role.REVIEWER, username="alice")
    version_services.skill_revision_approve(revision=revision, actor=first)

    response = reviewer_client.post(
        url("revision_approve", project, revision_id=revision.pk), HTTP_HX_REQUEST="true"
    )

    assert response.status_code == 409
    assert "already approved by alice at" in response.content.decode()
    assert PolicyVersion.objects.filter(project=project).count() == 2


def test_a_viewer_sees_the_queue_but_cannot_decide(project, viewer_client):
    revision = propose(project)

    page = viewer_client.get(url("revision_detail", project, revision_id=revision.pk))
    response = viewer_client.post(url("revision_approve", project, revision_id=revision.pk))

    assert page.status_code == 200 and b'id="approve-form"' not in page.content
    assert response.status_code == 403
    assert SkillRevision.objects.get(pk=revision.pk).status == RevisionStatus.PROPOSED


def test_a_non_member_gets_404_for_the_project(project, other_project, client):
    client.force_login(factories.make_member(other_project, Role.ADMIN))
    revision = propose(project)

    assert client.get(url("review_queue", project)).status_code == 404
    assert client.post(url("revision_approve", project, revision_id=revision.pk)).status_code == 404


def test_a_revision_of_another_project_is_not_found_through_mine(
    project, other_project, reviewer_client
):
    foreign = propose(other_project)

    response = reviewer_client.post(url("revision_approve", project, revision_id=foreign.pk))

    assert response.status_code == 404
    assert SkillRevision.objects.get(pk=foreign.pk).status == RevisionStatus.PROPOSED


def test_rejecting_without_a_reason_answers_422_and_keeps_it_proposed(project, reviewer_client):
    revision = propose(project)

    response = reviewer_client.post(url("revision_reject", project, revision_id=revision.pk),
                                    {"reason": ""}, HTTP_HX_REQUEST="true")  # fmt: skip

    assert response.status_code == 422
    assert "Give a reason." in response.content.decode()
    assert SkillRevision.objects.get(pk=revision.pk).status == RevisionStatus.PROPOSED


def test_rejecting_with_a_reason(project, reviewer_client):
    revision = propose(project)

    reviewer_client.post(
        url("revision_reject", project, revision_id=revision.pk), {"reason": "vague"}
    )

    revision.refresh_from_db()
    assert (revision.status, revision.decision_reason) == (RevisionStatus.REJECTED, "vague")


def test_edit_then_approve_publishes_the_edited_text(project, reviewer_client):
    revision = propose(project)

    response = reviewer_client.post(
        url("revision_edit", project, revision_id=revision.pk),
        {
            "name": "Use ISO 8601 dates",
            "description": "When a tool wants a date.",
            "instructions": "Pass YYYY-MM-DD; never 'last week'.",
            "category": "common_mistakes",
            "approve": "1",
        },
    )

    edited = SkillRevision.objects.get(parent=revision)
    assert response.status_code == 302
    assert response["Location"] == url("revision_detail", project, revision_id=edited.pk)
    assert edited.status == RevisionStatus.APPROVED
    assert edited.instructions == "Pass YYYY-MM-DD; never 'last week'."
    assert list(PolicyVersion.objects.get(project=project, status="active").revisions.all()) == [
        edited
    ]


def test_an_invalid_edit_answers_422_naming_the_problem_and_keeps_the_text(
    project, reviewer_client
):
    revision = propose(project)

    response = reviewer_client.post(
        url("revision_edit", project, revision_id=revision.pk),
        {"name": "x", "description": "y", "instructions": "  ", "category": "general"},
    )

    assert response.status_code == 422
    assert "The instructions must not be empty." in response.content.decode()
    assert SkillRevision.objects.filter(skill=revision.skill).count() == 1


# --- versions --------------------------------------------------------------------------------


def approved(project, slug, **kw) -> SkillRevision:
    revision = propose(project, slug, **kw)
    version_services.skill_revision_approve(revision=revision, actor=None)
    return revision


def test_versions_list_marks_the_active_one(project, viewer_client):
    approved(project, "iso-dates")

    response = viewer_client.get(url("version_list", project))

    body = response.content.decode()
    assert response.context["active"].number == 2
    assert '<tr class="is-active">' in body
    assert "Roll back to this" not in body  # a viewer gets no admin actions


def test_the_version_diff_shows_added_and_changed_skills_word_by_word(project, viewer_client):
    approved(project, "iso-dates")  # v2
    approved(project, "iso-dates", instructions="Always pass dates as ISO 8601 YYYY-MM-DD.")  # v3
    approved(project, "be-polite", name="Be polite")  # v4

    response = viewer_client.get(url("version_diff", project), {"from": 2, "to": 4})

    diff = response.context["diff"]
    assert [r.skill.slug for r in diff.added] == ["be-polite"]
    assert [c.slug for c in diff.changed] == ["iso-dates"]
    assert "<ins>ISO 8601 </ins>" in response.content.decode()


def test_the_rollback_confirmation_names_exactly_what_changes(project, admin_client):
    approved(project, "iso-dates")  # v2
    approved(project, "be-polite", name="Be polite")  # v3

    response = admin_client.get(url("version_rollback", project, number=2))

    body = response.content.decode()
    assert "Roll back to v2?" in body
    assert "removes be-polite r1 (Be polite)" in body
    assert PolicyVersion.objects.get(project=project, status="active").number == 3


def test_an_admin_rolls_back_from_the_confirmation(project, admin_client):
    approved(project, "iso-dates")
    dropped = approved(project, "be-polite")

    response = admin_client.post(url("version_rollback", project, number=2), {"reason": "broke"})

    assert response.status_code == 302
    assert PolicyVersion.objects.get(project=project, status="active").number == 2
    dropped.refresh_from_db()
    assert dropped.rolled_back_at is not None
    assert Release.objects.filter(project=project, kind="rollback").count() == 1


def test_a_reviewer_may_not_roll_back(project, reviewer_client):
    approved(project, "iso-dates")

    response = reviewer_client.post(url("version_rollback", project, number=1), {"reason": "x"})

    assert response.status_code == 403
    assert PolicyVersion.objects.get(project=project, status="active").number == 2


def test_promoting_a_version_that_is_no_longer_a_candidate_explains_why(project, admin_client):
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://r/1", base_model="m", changelog="LoRA"
    )
    version_services.policy_version_promote(
        version=candidate, actor=None, actor_label="api-key:ab12"
    )

    response = admin_client.post(url("version_promote", project, number=candidate.number))

    assert response.status_code == 409
    assert "already active (promotion by api-key:ab12" in response.content.decode()


def test_an_admin_promotes_a_candidate(project, admin_client):
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref="tinker://r/1", base_model="m", changelog="LoRA"
    )

    confirm = admin_client.get(url("version_promote", project, number=candidate.number))
    response = admin_client.post(url("version_promote", project, number=candidate.number))

    assert "adapter (none) → tinker://r/1" in confirm.content.decode()
    assert response.status_code == 302
    assert PolicyVersion.objects.get(project=project, status="active") == candidate


def test_the_skills_library_shows_revisions_and_the_versions_holding_them(project, viewer_client):
    first = approved(project, "iso-dates")
    approved(project, "iso-dates", instructions="v2 text")

    response = viewer_client.get(url("skill_library", project))

    body = response.content.decode()
    skill = response.context["skills"][0]
    revisions = list(skill.revisions.all())
    assert [r.number for r in revisions] == [2, 1]
    assert [v.number for v in revisions[1].policy_versions.all()] == [2]
    assert first.skill.slug in body


# --- query counts stay fixed whatever the data size -------------------------------------------


def _grow(api, key, project, n: int) -> None:
    for i in range(n):
        incident = ingest(
            api, key, f"grow-{n}-{i}", error={"type": f"E{i}", "message": f"boom {i}"}
        )
        revision = propose(project, f"grow-{n}-{i}", [incident])
        if i % 2:
            version_services.skill_revision_approve(revision=revision, actor=None)


PAGES = {
    "review_queue": lambda p, r: url("review_queue", p),
    "revision_detail": lambda p, r: url("revision_detail", p, revision_id=r.pk),
    "version_list": lambda p, r: url("version_list", p),
    "version_detail": lambda p, r: url("version_detail", p, number=2),
    "version_diff": lambda p, r: url("version_diff", p) + "?from=1&to=2",
    "version_rollback": lambda p, r: url("version_rollback", p, number=1),
    "skill_library": lambda p, r: url("skill_library", p),
}
QUERIES = {
    "review_queue": 7,
    "revision_detail": 14,  # + provenance (abusive marks) and the skill's project
    "version_list": 7,
    "version_detail": 9,
    "version_diff": 11,
    "version_rollback": 11,
    "skill_library": 9,
}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_issue_a_fixed_number_of_queries(
    page, api, ingest_key, project, admin_client, django_assert_num_queries
):
    incident = ingest(api, ingest_key, "base-1")
    revision = propose(project, "base", [incident])
    approved(project, "first")  # v2
    path = PAGES[page](project, revision)
    admin_client.get(path)  # warm the session

    with django_assert_num_queries(QUERIES[page]):
        assert admin_client.get(path).status_code == 200
    _grow(api, ingest_key, project, 6)
    with django_assert_num_queries(QUERIES[page]):
        assert admin_client.get(path).status_code == 200


def test_a_version_diff_with_a_non_numeric_version_is_a_404(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    assert client.get(f"/p/{project.slug}/versions/diff/?to=abc").status_code == 404
    assert client.get(f"/p/{project.slug}/versions/diff/?from=x&to=1").status_code == 404
