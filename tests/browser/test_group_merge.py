"""In a real browser: a reviewer merges two groups of one failure mode, sees why groups are
related, then splits the merged wording off again."""

from __future__ import annotations

import pytest

from base.models import AuditEvent
from incidents.models import IncidentGroup
from tests import factories

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_reviewer_merges_then_splits_a_group(page, project, person, log_in, client, screenshot):
    key = factories.make_key(project, scopes=["ingest"], name="ingest for tests")
    api = factories.ApiClient(client)
    items = [
        factories.incident_payload(f"u-{i}", error={"type": "ToolError", "message": message})
        for i, message in enumerate(
            [
                "book_reservation failed: payment method credit_card_1234567 not found",
                "book_reservation failed: payment method credit_card_7654321 not found",
                "Error: payment method not found: 'gift_card_42'",
            ]
        )
    ]
    assert api.post("/api/v1/incidents/batch", {"items": items}, key).status_code in (200, 207)
    first, second = IncidentGroup.objects.order_by("pk")
    events_of_second = second.event_count
    person("reviewer", "rita")
    log_in("rita")

    page.goto(f"/p/{project.slug}/groups/{first.pk}/")
    grouping = page.locator("#grouping")
    assert grouping.locator("tbody tr").count() == 1
    page.fill("#merge-group-ids", str(second.pk))
    page.get_by_role("button", name="Merge", exact=True).click()
    page.wait_for_load_state()
    screenshot("merged")
    assert "Merged 1 group here." in page.content()
    assert grouping.locator("tbody tr").count() == 2
    assert f"was group {second.pk}" in grouping.inner_text()
    second.refresh_from_db()
    assert second.merged_into_id == first.pk
    assert AuditEvent.objects.filter(action="incident_group.merged").count() == 1

    grouping.get_by_role("button", name="Split off").click()
    page.wait_for_load_state()
    screenshot("split")
    assert f"Split off: group {second.pk}." in page.content()
    assert grouping.locator("tbody tr").count() == 1
    second.refresh_from_db()
    assert second.merged_into_id is None and second.event_count == events_of_second
