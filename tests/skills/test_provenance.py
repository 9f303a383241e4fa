"""Issue 22, item 2: provenance on every proposal. How many distinct sessions, end users,
agents and API keys stand behind a proposal's evidence, on the review page, in the API and in
notifications; a project's minimum of sources before synthesis; a single-source proposal that
a chat link cannot approve."""

from __future__ import annotations

import pytest
from django.urls import reverse

from incidents.models import Incident, IncidentGroup, SynthesisStatus
from skills.approvals import links as approvals
from skills.library.models import SkillRevision
from tests import factories
from tests.fakes.openai_server import Reply
from tests.helpers import chat_link_approval_refused, review_page
from tests.skills.test_synthesis import answer

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fast_llm_retries")]


def report(api, key, capture, **fields) -> IncidentGroup:
    with capture(execute=True):
        response = api.post("/api/v1/incidents", factories.incident_payload(**fields), key=key)
    assert response.status_code == 202, response.content
    return IncidentGroup.objects.get(pk=response.json()["group_id"])


def test_a_single_session_proposal_is_labelled_and_a_chat_link_cannot_approve_it(
    api, client, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    llm_server.enqueue(Reply(content=answer()))
    # The end user as agents send it: a top-level ``user`` (kept in metadata too).
    group = report(
        api, ingest_key, django_capture_on_commit_callbacks, session_id="s-1", user="mallory"
    )

    incident = Incident.objects.get(group=group)
    assert (incident.session_id, incident.end_user) == ("s-1", "mallory")
    assert incident.api_key_id is not None
    revision = SkillRevision.objects.get(source_groups=group)
    assert revision.provenance == {
        "incidents": 1,
        "sessions": 1,
        "end_users": 1,
        "agents": 1,
        "api_keys": 1,
        "sources": 1,
        "single_source": True,
    }
    # In the API.
    response = api.get(f"/api/v1/groups/{group.pk}/provenance", key=ingest_key)
    assert response.status_code == 200
    assert response.json()["single_source"] is True
    admin_key = factories.make_key(project, ["admin"])
    shown = api.get(f"/api/v1/skills/revisions/{revision.pk}", key=admin_key).json()
    assert shown["provenance"]["single_source"] is True and shown["provenance"]["sources"] == 1
    # On the review page.
    reviewer = factories.make_member(project, "reviewer", "rita")
    client.force_login(reviewer)
    page = review_page(client, revision)
    assert "Single source" in page
    assert "1 distinct source" in page
    # In notifications: the title says so.
    evidence = approvals.revision_evidence(revision)
    assert approvals.provenance_note(evidence["provenance"]).startswith(" · single source")
    # A chat link refuses to approve it, and nothing changes.
    assert "single source" in chat_link_approval_refused(client, revision, reviewer)


def test_a_group_waits_for_the_projects_minimum_of_sources_then_is_taken(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    project.min_sources_for_synthesis = 2
    project.save(update_fields=["min_sources_for_synthesis"])

    group = report(api, ingest_key, django_capture_on_commit_callbacks, session_id="s-1")
    # The same session again adds no source.
    group = report(api, ingest_key, django_capture_on_commit_callbacks, session_id="s-1")

    assert group.synthesis_status == SynthesisStatus.SOURCES
    assert "1 of 2" in group.synthesis_error
    assert not SkillRevision.objects.exists()
    assert llm_server.chat_requests() == []

    llm_server.enqueue(Reply(content=answer()))
    group = report(api, ingest_key, django_capture_on_commit_callbacks, session_id="s-2")

    assert group.synthesis_status == SynthesisStatus.PROPOSED
    revision = SkillRevision.objects.get(source_groups=group)
    assert revision.provenance["sources"] == 2
    assert revision.provenance["sessions"] == 2
    assert revision.provenance["single_source"] is False
    assert "2 sources: 2 session(s)" in approvals.provenance_note(
        approvals.revision_evidence(revision)["provenance"]
    )


def test_incidents_that_name_no_source_count_as_one(
    api, project, ingest_key, llm_server, django_capture_on_commit_callbacks
):
    project.min_sources_for_synthesis = 2
    project.save(update_fields=["min_sources_for_synthesis"])

    for _ in range(3):
        group = report(api, ingest_key, django_capture_on_commit_callbacks)

    assert group.synthesis_status == SynthesisStatus.SOURCES
    response = api.get(f"/api/v1/groups/{group.pk}/provenance", key=ingest_key)
    assert response.json() == {
        "incidents": 3,
        "sessions": 0,
        "end_users": 0,
        "agents": 1,
        "api_keys": 1,
        "sources": 1,
        "single_source": True,
    }


def test_the_minimum_is_a_project_setting_on_its_page(client, project):
    admin = factories.make_member(project, "admin", "ada")
    client.force_login(admin)
    url = reverse("project:settings", kwargs={"project_slug": project.slug})

    page = client.get(url).content.decode()
    assert "Distinct sources before a skill is proposed" in page

    from base.forms import ProjectSettingsForm

    data = {k: v for k, v in ProjectSettingsForm.initial_for(project).items() if v is not None}
    data["min_sources_for_synthesis"] = "0"
    data["upstream_model_map"] = ""
    response = client.post(url, data)
    assert response.status_code == 422
    assert "Distinct sources before a skill is proposed</a>:" in response.content.decode()
    project.refresh_from_db()
    assert project.min_sources_for_synthesis == 1


def test_a_source_is_the_end_user_else_the_session_else_the_key(
    api, project, django_capture_on_commit_callbacks
):
    project.min_sources_for_synthesis = 1000  # nothing is synthesised: only the counts matter
    project.save(update_fields=["min_sources_for_synthesis"])
    key_a, key_b = factories.make_key(project, ["ingest"]), factories.make_key(project, ["ingest"])
    capture = django_capture_on_commit_callbacks
    for key, fields in [
        (key_a, {"user": "u1", "session_id": "s1"}),  # user:u1
        (key_b, {"user": "u1", "session_id": "s2"}),  # user:u1 again
        (key_a, {"session_id": "s1"}),  # session:s1
        (key_a, {}),  # key:a
        (key_b, {}),  # key:b
    ]:
        group = report(api, key, capture, **fields)

    expected = {
        "incidents": 5,
        "sessions": 2,
        "end_users": 1,
        "agents": 1,
        "api_keys": 2,
        "sources": 4,
        "single_source": False,
    }
    assert api.get(f"/api/v1/groups/{group.pk}/provenance", key=key_a).json() == expected
    # Given a query of group ids (a revision's source groups) instead of a list: the same.
    from incidents.provenance import groups_provenance

    assert groups_provenance(IncidentGroup.objects.filter(pk=group.pk).values("pk")) == expected
    assert groups_provenance(IncidentGroup.objects.filter(pk=group.pk)) == expected
    assert groups_provenance([]) == {
        "incidents": 0,
        "sessions": 0,
        "end_users": 0,
        "agents": 0,
        "api_keys": 0,
        "sources": 0,
        "single_source": True,
    }
