"""In a real browser: the effectiveness panel (rate per day with the activation marked) loads
by htmx into the proposal page, the version page and the incident group's page, and a skill
that did not work is back in the review queue with its figures."""

from __future__ import annotations

import pytest

from skills.effectiveness import tasks
from tests.skills.test_effectiveness import _live_skill

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# The first page that redacts evidence loads the PII detector in the server (slow, once).
SLOW_PAGE_MS = 120_000


def _chart(page):
    panel = page.locator("#effectiveness")
    panel.wait_for(state="visible")
    assert page.locator("#effectiveness svg.eff-chart").count() == 1
    return panel


def test_an_ineffective_skill_shows_its_chart_and_waits_in_the_review_queue(
    project, person, log_in, page, screenshot, effectiveness_thresholds
):
    person("reviewer", "rita")
    revision, group, _admin = _live_skill(project, "nothing")
    tasks.check_effectiveness()
    log_in("rita")

    page.goto(f"/p/{project.slug}/review/", timeout=SLOW_PAGE_MS)
    item = page.locator(f'.queue-item[data-id="{revision.pk}"]')
    assert "live, did not work" in item.inner_text()
    item.click()
    panel = _chart(page)
    screenshot("proposal")
    text = panel.inner_text()
    assert "No change" in text and "Back in review" in text
    assert "100 → 100" in text or "100" in panel.locator(".rate-before").inner_text()
    assert panel.locator("line.eff-activation").count() == 1
    # Bars: a week on each side of the activation, each day with traffic.
    assert panel.locator("rect.eff-bar").count() >= 14

    number = revision.policy_versions.get().number
    page.goto(f"/p/{project.slug}/versions/{number}/")
    panel = _chart(page)
    assert "No change" in panel.inner_text()
    assert panel.locator("line.eff-activation").count() == 1

    page.goto(f"/p/{project.slug}/groups/{group.pk}/", timeout=SLOW_PAGE_MS)
    panel = _chart(page)
    screenshot("group")
    assert "No change" in panel.inner_text()
    assert panel.locator("line.eff-activation").count() == 1
    assert not page.js_errors


def test_an_effective_skill_shows_improved_and_is_not_in_the_queue(
    project, person, log_in, page, effectiveness_thresholds
):
    person("reviewer", "rita")
    revision, _group, _admin = _live_skill(project, "fixes")
    tasks.check_effectiveness()
    log_in("rita")

    page.goto(f"/p/{project.slug}/review/{revision.pk}/", timeout=SLOW_PAGE_MS)
    panel = _chart(page)
    assert "Improved" in panel.inner_text()
    assert "Back in review" not in panel.inner_text()
    assert page.locator(f'.queue-item[data-id="{revision.pk}"]').count() == 0
    assert not page.js_errors
