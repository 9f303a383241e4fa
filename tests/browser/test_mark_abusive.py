"""In a real browser: an admin marks the session behind an incident as abusive from the group
page (confirming, with a reason), sees who marked it in place, and undoes it."""

from __future__ import annotations

import pytest

from base.models import AuditEvent
from incidents.models import AbusiveSource, IncidentGroup
from tests import factories

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_admin_marks_a_session_abusive_and_undoes_it(
    page, project, person, log_in, client, screenshot
):
    key = factories.make_key(project, scopes=["ingest"], name="ingest for tests")
    api = factories.ApiClient(client)
    for session in ("s-bad", "s-good"):
        payload = factories.incident_payload(session_id=session)
        assert api.post("/api/v1/incidents", payload, key).status_code == 202
    group = IncidentGroup.objects.get()
    ada = person("admin", "ada")
    log_in("ada")
    dialogs: list[str] = []

    def accept(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)

    page.goto(f"/p/{project.slug}/groups/{group.pk}/")
    source = page.locator('.abusive-source[data-kind="session"][data-value="s-bad"]')
    source.locator("summary", has_text="Mark abusive").click()  # opens the form
    source.get_by_label("Reason").fill("prompt injection attempts")
    source.get_by_role("button", name="Mark abusive").click()

    marked = page.locator('.abusive-source.marked[data-value="s-bad"]')
    marked.wait_for()
    screenshot("marked")
    assert "Marked abusive by ada" in marked.inner_text()
    assert "prompt injection attempts" in marked.inner_text()
    assert dialogs and "as abusive?" in dialogs[0]
    mark = AbusiveSource.objects.get()
    assert (mark.kind, mark.value, mark.marked_by_id) == ("session", "s-bad", ada.pk)
    assert AuditEvent.objects.filter(action="abusive_source.mark", actor=ada).count() == 1
    # The other session's card is untouched.
    assert page.locator('.abusive-source.marked[data-value="s-good"]').count() == 0

    marked.get_by_role("button", name="Undo").click()
    page.locator('.abusive-source:not(.marked)[data-value="s-bad"]').wait_for()
    assert not AbusiveSource.objects.exists()
    assert AuditEvent.objects.filter(action="abusive_source.unmark").count() == 1
    assert page.js_errors == []
