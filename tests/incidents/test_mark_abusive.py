"""Issue 22, item 4, on the dashboard: an admin marks the session or end user of an incident as
abusive from the group page, with a reason; the mark is the API's (one service), audited, and
flags the proposals built on its incidents; it can be undone; people below admin cannot."""

from __future__ import annotations

import pytest
from django.urls import reverse

from base.models import AuditEvent, Role
from incidents.models import AbusiveSource, Incident
from skills.library.models import SkillRevision
from tests import factories

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def evidence(api, project, ingest_key) -> tuple[list[Incident], SkillRevision]:
    """Two incidents of one group, from session s-bad (end user u-9) and s-good, and the
    proposal built on them."""
    incidents = []
    for session, end_user in (("s-bad", "u-9"), ("s-good", "")):
        response = api.post(
            "/api/v1/incidents",
            factories.incident_payload(session_id=session, end_user=end_user),
            key=ingest_key,
        )
        assert response.status_code == 202, response.content
        incidents.append(Incident.objects.get(pk=response.json()["id"]))
    assert incidents[0].group_id == incidents[1].group_id
    revision = factories.make_revision(
        project, source_incidents=incidents, source_groups=[incidents[0].group]
    )
    return incidents, revision


def group_url(project, incident) -> str:
    return reverse(
        "incidents:group_detail",
        kwargs={"project_slug": project.slug, "group_id": incident.group_id},
    )


def mark_url(project) -> str:
    return reverse("incidents:abusive_source_mark", kwargs={"project_slug": project.slug})


def unmark_url(project, mark) -> str:
    return reverse(
        "incidents:abusive_source_unmark",
        kwargs={"project_slug": project.slug, "mark_id": mark.pk},
    )


def test_an_admin_marks_a_session_abusive_from_the_group_page_and_its_proposal_is_flagged(
    client, project, evidence
):
    incidents, revision = evidence
    ada = factories.make_member(project, Role.ADMIN, "ada")
    client.force_login(ada)
    page = client.get(group_url(project, incidents[0])).content.decode()
    assert page.count("<summary>Mark abusive</summary>") == 3  # two sessions, one end user
    assert 'data-kind="session" data-value="s-bad"' in page
    assert 'data-kind="end_user" data-value="u-9"' in page

    response = client.post(
        mark_url(project),
        {"kind": "session", "value": "s-bad", "reason": "prompt injection", "next": "/"},
        **HTMX,
    )

    assert response.status_code == 200
    block = response.content.decode()
    assert block.lstrip().startswith(
        '<div class="abusive-source marked actions" data-kind="session"'
    )
    assert "Marked abusive by ada" in block and "prompt injection" in block
    assert ">Undo</button>" in block and "<html" not in block
    mark = AbusiveSource.objects.get()
    assert (mark.project, mark.kind, mark.value, mark.reason, mark.marked_by) == (
        project,
        "session",
        "s-bad",
        "prompt injection",
        ada,
    )
    audit = AuditEvent.objects.get(action="abusive_source.mark")
    assert (audit.actor, audit.project) == (ada, project)
    assert audit.after["groups"] == [incidents[0].group_id]
    # The proposal built on its incidents is flagged where reviewers decide.
    reviewer = factories.make_member(project, Role.REVIEWER, "rita")
    client.force_login(reviewer)
    detail = client.get(
        reverse(
            "skills:revision_detail",
            kwargs={"project_slug": project.slug, "revision_id": revision.pk},
        )
    ).content.decode()
    assert "Flagged:" in detail and "s-bad" in detail and "prompt injection" in detail
    # And the group page says so to everyone, without the controls below admin.
    page = client.get(group_url(project, incidents[0])).content.decode()
    assert "Marked abusive by ada" in page
    assert "Mark abusive</summary>" not in page and ">Undo</button>" not in page


def test_marking_needs_a_reason_and_changes_nothing_without_one(client, project, evidence):
    client.force_login(factories.make_member(project, Role.ADMIN))

    response = client.post(
        mark_url(project), {"kind": "session", "value": "s-bad", "reason": "  "}, **HTMX
    )

    assert response.status_code == 422
    block = response.content.decode()
    assert 'data-field="reason"' in block and "Give a reason" in block
    assert '<details class="mark-abusive" open>' in block
    assert not AbusiveSource.objects.exists()
    assert not AuditEvent.objects.filter(action__startswith="abusive_source").exists()


def test_an_unknown_kind_is_refused_naming_the_field(client, project, evidence):
    client.force_login(factories.make_member(project, Role.ADMIN))

    response = client.post(
        mark_url(project), {"kind": "ip", "value": "10.0.0.1", "reason": "spam"}, **HTMX
    )

    assert response.status_code == 422
    assert 'data-field="kind"' in response.content.decode()
    assert not AbusiveSource.objects.exists()


def test_undo_takes_the_mark_back_and_is_audited(client, project, evidence):
    incidents, _revision = evidence
    admin = factories.make_member(project, Role.ADMIN)
    client.force_login(admin)
    client.post(
        mark_url(project), {"kind": "end_user", "value": "u-9", "reason": "scripted"}, **HTMX
    )
    mark = AbusiveSource.objects.get()

    response = client.post(unmark_url(project, mark), **HTMX)

    assert response.status_code == 200
    block = response.content.decode()
    assert 'data-kind="end_user" data-value="u-9"' in block
    assert "<summary>Mark abusive</summary>" in block and "Marked abusive" not in block
    assert not AbusiveSource.objects.exists()
    unmarked = AuditEvent.objects.get(action="abusive_source.unmark")
    assert (unmarked.actor, unmarked.before["value"]) == (admin, "u-9")


def test_a_plain_form_post_returns_to_the_group_page_with_a_message(client, project, evidence):
    incidents, _revision = evidence
    client.force_login(factories.make_member(project, Role.ADMIN))
    back = group_url(project, incidents[0])

    response = client.post(
        mark_url(project),
        {"kind": "session", "value": "s-bad", "reason": "spam", "next": back},
        follow=True,
    )

    assert response.redirect_chain == [(back, 302)]
    assert "Marked session s-bad as abusive." in response.content.decode()
    assert AbusiveSource.objects.filter(value="s-bad").exists()
    # A "next" elsewhere is not followed.
    offsite = client.post(
        mark_url(project),
        {"kind": "session", "value": "s-good", "reason": "spam", "next": "https://evil.test/"},
    )
    assert offsite.status_code == 302 and offsite["Location"].startswith("/p/")


@pytest.mark.parametrize("role", [Role.VIEWER, Role.REVIEWER])
def test_people_below_admin_can_neither_mark_nor_undo_nor_see_the_end_user(
    client, project, evidence, role
):
    incidents, _revision = evidence
    mark = AbusiveSource.objects.create(project=project, kind="session", value="s-good")
    client.force_login(factories.make_member(project, role))

    page = client.get(group_url(project, incidents[0])).content.decode()
    marked = client.post(
        mark_url(project), {"kind": "session", "value": "s-bad", "reason": "x"}, **HTMX
    )
    unmarked = client.post(unmark_url(project, mark), **HTMX)

    assert "Mark abusive</summary>" not in page
    assert 'data-kind="end_user"' in page and "u-9" not in page  # personal data, hidden
    assert marked.status_code == unmarked.status_code == 403
    assert list(AbusiveSource.objects.values_list("value", flat=True)) == ["s-good"]
    assert not AuditEvent.objects.filter(action__startswith="abusive_source").exists()


def test_another_projects_mark_cannot_be_undone_here(client, project, other_project, evidence):
    theirs = AbusiveSource.objects.create(project=other_project, kind="session", value="s-bad")
    client.force_login(factories.make_member(project, Role.ADMIN))

    response = client.post(unmark_url(project, theirs), **HTMX)

    assert response.status_code == 404
    assert AbusiveSource.objects.filter(pk=theirs.pk).exists()
