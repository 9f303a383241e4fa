"""In a real browser: an admin starts a canary from the versions page, sees its arms, stops it,
starts another and promotes it; then the database is checked."""

from __future__ import annotations

import pytest

from base.models import AuditEvent
from skills.canary.models import CanaryOutcome, CanaryRelease
from skills.versions import services as version_services
from skills.versions.models import PolicyVersion, VersionStatus

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_admin_starts_stops_and_promotes_a_canary_from_the_versions_page(
    page, project, person, log_in, screenshot
):
    admin = person("admin", "ada")
    candidate = version_services.policy_version_create_candidate(
        project=project, actor=admin, changelog="New adapter", adapter_ref="runs/7/adapter"
    )
    log_in("ada")

    page.goto(f"/p/{project.slug}/versions/")
    panel = page.locator("section#canary")
    panel.locator("#canary-share").fill("20")
    panel.locator("#canary-margin").fill("15")
    panel.locator("#canary-min-turns").fill("100")
    panel.get_by_role("button", name="Start the canary").click()
    page.locator("[data-canary-state=running]").wait_for()
    assert "20 %" in page.locator("section#canary").inner_text()
    assert page.locator("tr[data-arm=canary]").count() == 1
    screenshot("running")

    canary = CanaryRelease.objects.get(project=project)
    assert (canary.version_id, canary.share_percent, canary.margin_per_1000, canary.min_turns) == (
        candidate.pk, 20, 15.0, 100
    )  # fmt: skip
    assert canary.started_by_label == "ada"

    page.get_by_role("button", name="Stop the canary").click()
    page.locator("[data-canary-state=stopped]").wait_for()
    canary.refresh_from_db()
    assert canary.outcome == CanaryOutcome.STOPPED and canary.ended_by_label == "ada"

    page.get_by_role("button", name="Start the canary").click()
    page.locator("[data-canary-state=running]").wait_for()
    page.get_by_role("button", name=f"Promote v{candidate.number} to everyone").click()
    page.locator("[data-canary-state=promoted]").wait_for()
    screenshot("promoted")

    assert PolicyVersion.objects.get(pk=candidate.pk).status == VersionStatus.ACTIVE
    assert list(
        CanaryRelease.objects.filter(project=project)
        .order_by("id")
        .values_list("outcome", flat=True)
    ) == [CanaryOutcome.STOPPED, CanaryOutcome.PROMOTED]
    actions = set(AuditEvent.objects.filter(project=project).values_list("action", flat=True))
    assert {
        "canary.start",
        "canary.stopped",
        "canary.promoted",
        "policy_version.promotion",
    } <= actions
    assert page.js_errors == []


def test_a_viewer_sees_the_canary_but_no_controls(page, project, person, log_in):
    person("viewer", "vic")
    log_in("vic")

    page.goto(f"/p/{project.slug}/versions/")

    page.locator("[data-canary-state=none]").wait_for()
    assert page.get_by_role("button", name="Start the canary").count() == 0
