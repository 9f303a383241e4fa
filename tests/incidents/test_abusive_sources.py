"""Issue 22, item 4: a person marks a session or end user as abusive through the API: audited,
idempotent, refused with the field named, and the proposals whose evidence came from it are
flagged on the review page and cannot be approved from a chat link."""

from __future__ import annotations

import pytest

from base.models import AuditEvent
from incidents.models import AbusiveSource, IncidentGroup
from skills.library.models import SkillRevision
from tests import factories
from tests.helpers import chat_link_approval_refused, review_page

pytestmark = pytest.mark.django_db


def delete(api, path: str, key: str):
    return api.client.delete(path, HTTP_AUTHORIZATION=f"Bearer {key}")


def test_marking_is_audited_idempotent_and_unmarking_removes_it(api, project, admin_key):
    body = {"kind": "end_user", "value": "u-42", "reason": "scripted abuse"}

    first = api.post("/api/v1/abusive-sources", body, key=admin_key)
    again = api.post("/api/v1/abusive-sources", body, key=admin_key)

    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    mark = AbusiveSource.objects.get()
    assert (mark.project, mark.kind, mark.value, mark.reason) == (
        project,
        "end_user",
        "u-42",
        "scripted abuse",
    )
    assert AuditEvent.objects.filter(action="abusive_source.mark").count() == 1
    listed = api.get("/api/v1/abusive-sources", key=admin_key).json()
    assert [m["value"] for m in listed] == ["u-42"]

    response = delete(api, f"/api/v1/abusive-sources/{mark.pk}", admin_key)

    assert response.status_code == 204
    assert not AbusiveSource.objects.exists()
    assert AuditEvent.objects.filter(action="abusive_source.unmark").count() == 1


def test_bad_input_names_the_field_and_other_keys_are_refused(
    api, project, admin_key, ingest_key, other_project
):
    bad = api.post("/api/v1/abusive-sources", {"kind": "ip", "value": "x"}, key=admin_key)
    assert bad.status_code == 422
    assert "kind" in bad.content.decode()
    blank = api.post("/api/v1/abusive-sources", {"kind": "session", "value": " "}, key=admin_key)
    assert blank.status_code in (400, 422)
    assert "value" in blank.content.decode()
    refused = api.post("/api/v1/abusive-sources", {"kind": "session", "value": "s"}, key=ingest_key)
    assert refused.status_code == 403
    assert not AbusiveSource.objects.exists()
    # Another project's mark is not this key's to remove.
    theirs = AbusiveSource.objects.create(project=other_project, kind="session", value="s")
    response = delete(api, f"/api/v1/abusive-sources/{theirs.pk}", admin_key)
    assert response.status_code == 404
    assert AbusiveSource.objects.filter(pk=theirs.pk).exists()


def test_a_proposal_from_an_abusive_session_is_flagged_and_no_chat_link_approves_it(
    api, client, project, ingest_key, admin_key, django_capture_on_commit_callbacks
):
    # No LLM configured: the fast loop proposes a draft built from the evidence.
    with django_capture_on_commit_callbacks(execute=True):
        for session in ("s-good", "s-bad"):
            response = api.post(
                "/api/v1/incidents", factories.incident_payload(session_id=session), key=ingest_key
            )
            assert response.status_code == 202
    group = IncidentGroup.objects.get(pk=response.json()["group_id"])
    revision = SkillRevision.objects.get(source_groups=group)
    assert revision.provenance["sessions"] >= 1

    response = api.post(
        "/api/v1/abusive-sources",
        {"kind": "session", "value": "s-bad", "reason": "prompt injection"},
        key=admin_key,
    )
    assert response.status_code == 201
    audit = AuditEvent.objects.get(action="abusive_source.mark")
    assert audit.after["groups"] == [group.pk]

    reviewer = factories.make_member(project, "reviewer", "rita")
    client.force_login(reviewer)
    page = review_page(client, revision)
    assert "Flagged:" in page
    assert "s-bad" in page and "prompt injection" in page

    chat_link_approval_refused(client, revision, reviewer)
