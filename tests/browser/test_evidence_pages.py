"""In a real browser: the group page and the review page show what the user wanted (the task),
how the run ended and scored, the feedback and the conversation; personal data is masked for
everyone but admins, and each page says what was looked for."""

from __future__ import annotations

import pytest

from incidents.models import IncidentGroup
from skills.library.models import SkillRevision
from tests import factories

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

TASK = "Cancel my reservation ZX81QK; my plans changed."


def _ingest(client, project) -> IncidentGroup:
    """One failed run, stored over the API; without an LLM the fast loop drafts a proposal."""
    key = factories.make_key(project, scopes=["ingest"], name="ingest for tests")
    payload = factories.incident_payload(
        "evidence-1",
        kind="policy_violation",
        error={"type": "PolicyViolation", "message": "Cancelled a basic economy ticket."},
        task=TASK,
        reward=0.0,
        outcome="Reservation ZX81QK cancelled.",
        expected_outcome="Reservation ZX81QK kept.",
        feedback={"text": "It cancelled a ticket the rules forbid.", "score": 1},
        messages=[
            {"role": "system", "content": "You are the travel desk."},
            {"role": "user", "content": TASK},
            {"role": "user", "content": "I'm Mia Li, born 1975-07-05, at 225 Cedar Avenue."},
            factories.tool_call_message("cancel_reservation", '{"reservation_id": "ZX81QK"}'),
            {
                "role": "tool",
                "tool_call_id": "c1",
                "name": "cancel_reservation",
                "content": '{"status": "cancelled"}',
            },  # fmt: skip
        ],
    )
    response = factories.ApiClient(client).post("/api/v1/incidents", payload, key)
    assert response.status_code in (200, 202), response.content
    return IncidentGroup.objects.get(pk=response.json()["group_id"])


def _open_first_conversation(page, project, group):
    """The group page's first incident, with its conversation unfolded."""
    page.goto(f"/p/{project.slug}/groups/{group.pk}/")
    incident = page.locator("article.incident").first
    incident.locator("details.conversation summary").click()
    return incident


def test_a_viewer_sees_the_task_reward_and_conversation_with_personal_data_masked(
    page, project, person, log_in, client, screenshot
):
    group = _ingest(client, project)
    person("viewer", "vera")
    log_in("vera")

    incident = _open_first_conversation(page, project, group)
    screenshot("group-viewer")

    text = incident.inner_text()
    assert f"Task: {TASK}" in text
    assert "Reward: 0" in text and "Feedback score: 1" in text
    assert "Outcome: Reservation ZX81QK cancelled." in text
    assert "Expected outcome: Reservation ZX81QK kept." in text
    assert "It cancelled a ticket the rules forbid." in text
    assert "Mia Li" not in text and "1975-07-05" not in text and "225 Cedar" not in text
    assert "[REDACTED:person]" in text and "[REDACTED:street_address]" in text
    failing = incident.locator(".msg-failing")
    assert failing.count() == 2 and "cancel_reservation" in failing.first.inner_text()
    assert "opening request" in incident.locator(".msg-user").first.text_content()
    note = incident.locator(".redaction-note").inner_text()
    assert "Redacted before it was shown to you." in note
    assert "Masked: 1 name, 1 date of birth, 1 street address." in note
    assert "Looked for: e-mail addresses" in note and "names, phone numbers" in note
    assert page.js_errors == []


def test_an_admin_sees_personal_data_and_the_page_says_it_was_not_masked(
    page, project, person, log_in, client
):
    group = _ingest(client, project)
    person("admin", "ada")
    log_in("ada")

    incident = _open_first_conversation(page, project, group)

    assert "Mia Li" in incident.inner_text()
    note = incident.locator(".redaction-note").inner_text()
    assert "personal data is not masked for project admins" in note
    assert "Not looked for: names, phone numbers, dates of birth, street addresses" in note


def test_the_review_page_shows_the_task_reward_and_what_the_evidence_was_redacted_of(
    page, project, person, log_in, client, screenshot
):
    group = _ingest(client, project)
    revision = SkillRevision.objects.get(source_groups=group)
    person("reviewer", "rita")
    log_in("rita")

    page.goto(f"/p/{project.slug}/review/{revision.pk}/")
    screenshot("review")

    detail = page.locator("#detail")
    incident = detail.locator("article.incident").first
    text = incident.inner_text()
    assert f"Task: {TASK}" in text and "Reward: 0" in text
    assert "Expected outcome: Reservation ZX81QK kept." in text
    assert "It cancelled a ticket the rules forbid." in text
    assert "Mia Li" not in text
    lead = detail.locator("p.redaction-note").first.inner_text()
    assert lead.startswith("The evidence behind this proposal was redacted first: Masked: ")
    assert "names, phone numbers, dates of birth, street addresses" in lead
    assert page.js_errors == []
