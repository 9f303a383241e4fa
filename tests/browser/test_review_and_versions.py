"""In a real browser: approve a proposal from the review queue with the keyboard, open a version
diff, roll back; then check what the database holds."""

from __future__ import annotations

import pytest

from base.models import AuditEvent
from incidents.models import IncidentGroup
from skills.library.models import Origin, RevisionStatus, SkillRevision
from skills.versions import services as version_services
from skills.versions.models import PolicyVersion, Release, ReleaseKind, VersionStatus
from tests import factories

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _group(client, project, error_type: str, events: int) -> IncidentGroup:
    key = factories.make_key(project, scopes=["ingest"], name=f"key {error_type}")
    items = [
        factories.incident_payload(
            f"{error_type}-{i}", error={"type": error_type, "message": "tool call failed"}
        )
        for i in range(events)
    ]
    response = factories.ApiClient(client).post("/api/v1/incidents/batch", {"items": items}, key)
    assert response.status_code in (200, 202, 207), response.content
    return IncidentGroup.objects.get(project=project, title__startswith=error_type)


def _propose(project, slug: str, name: str, groups=()) -> SkillRevision:
    return factories.make_revision(
        project,
        slug,
        name=name,
        description=f"When {name.lower()} matters.",
        instructions=f"Always {name.lower()} before answering; never guess.",
        origin=Origin.HUMAN,
        author="human",
        source_groups=list(groups),
    )


def _proposal_for(project, group: IncidentGroup, slug: str, name: str) -> SkillRevision:
    """The fast loop's proposal for ``group``, or one written by hand if it made none."""
    made = SkillRevision.objects.filter(source_groups=group, status=RevisionStatus.PROPOSED).first()
    return made or _propose(project, slug, name, groups=[group])


def _active(project) -> PolicyVersion:
    return PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)


def test_a_reviewer_approves_a_proposal_from_the_queue_with_the_keyboard(
    page, project, person, log_in, client, screenshot
):
    # Ingesting runs the fast loop (eagerly, on commit): without an LLM configured it drafts a
    # proposal from the evidence of each group.
    big = _group(client, project, "DateFormatError", events=5)
    small = _group(client, project, "TimeoutError", events=1)
    first = _proposal_for(project, big, "check-dates", "Check date formats")
    second = _proposal_for(project, small, "retry-timeouts", "Retry timeouts")
    assert SkillRevision.objects.filter(status=RevisionStatus.PROPOSED).count() == 2
    reviewer = person("reviewer", "rita")
    before = _active(project)

    log_in("rita")
    page.goto(f"/p/{project.slug}/review/")
    items = page.locator(".queue-item")
    assert items.count() == 2
    # Most impact first: five incidents before one.
    assert [items.nth(i).get_attribute("data-id") for i in range(2)] == [
        str(first.pk),
        str(second.pk),
    ]

    page.keyboard.press("j")
    page.locator(f'#detail[data-revision-id="{first.pk}"]').wait_for()
    page.keyboard.press("j")
    page.locator(f'#detail[data-revision-id="{second.pk}"]').wait_for()
    page.locator(f'.queue-item.selected[data-id="{second.pk}"]').wait_for()
    page.keyboard.press("k")
    page.locator(f'#detail[data-revision-id="{first.pk}"]').wait_for()
    page.locator(f'.queue-item.selected[data-id="{first.pk}"]').wait_for()
    assert first.name in page.locator("#detail h2").inner_text()
    screenshot("selected-with-keyboard")

    page.keyboard.press("a")
    page.locator("#detail .detail-head .badge-approved").wait_for()
    page.wait_for_function("document.querySelectorAll('.queue-item').length === 1")
    screenshot("approved")

    first.refresh_from_db()
    second.refresh_from_db()
    assert first.status == RevisionStatus.APPROVED
    assert first.decided_by == reviewer
    assert second.status == RevisionStatus.PROPOSED
    after = _active(project)
    assert after.number == before.number + 1
    assert list(after.revisions.all()) == [first]
    assert PolicyVersion.objects.get(pk=before.pk).status == VersionStatus.RETIRED
    release = Release.objects.get(project=project, to_version=after)
    assert (release.kind, release.from_version_id, release.actor) == (
        ReleaseKind.APPROVAL,
        before.pk,
        reviewer,
    )
    assert AuditEvent.objects.filter(
        project=project, actor=reviewer, object_id=str(first.pk), action__contains="approve"
    ).exists()
    assert page.locator(".queue-item").first.get_attribute("data-id") == str(second.pk)
    assert page.js_errors == []


def test_an_admin_opens_a_version_diff_and_rolls_back(page, project, person, log_in, screenshot):
    admin = person("admin", "ada")
    dates = _propose(project, "check-dates", "Check date formats")
    version_services.skill_revision_approve(revision=dates, actor=admin)
    good = _active(project)
    timeouts = _propose(project, "retry-timeouts", "Retry timeouts")
    version_services.skill_revision_approve(revision=timeouts, actor=admin)
    bad = _active(project)
    assert bad.number == good.number + 1

    log_in("ada")
    page.get_by_role("link", name="Versions", exact=True).click()
    page.wait_for_url(f"**/p/{project.slug}/versions/")
    assert page.locator("tr.is-active").inner_text().startswith(f"v{bad.number}")

    good_row = page.locator("tr").filter(
        has=page.locator(f'td:first-child a:text-is("v{good.number}")')
    )
    good_row.get_by_role("link", name="Diff vs active").click()
    page.wait_for_url("**/versions/diff/**")
    diff = page.locator("#diff")
    assert "Removed (1)" in diff.inner_text()
    assert "Retry timeouts" in diff.locator(".skill-removed").inner_text()
    screenshot("diff-active-to-good")

    page.evaluate("window.__sameDocument = true")
    page.select_option("#diff-from", str(good.number - 1))
    page.select_option("#diff-to", str(bad.number))
    page.wait_for_function("document.querySelector('#diff').innerText.includes('Added (2)')")
    assert page.evaluate("window.__sameDocument") is True  # swapped by htmx, not reloaded
    screenshot("diff-initial-to-bad")

    page.goto(f"/p/{project.slug}/versions/{good.number}/")
    page.get_by_role("link", name=f"Roll back to v{good.number}").click()
    confirm = page.locator(".confirm")
    assert f"Roll back to v{good.number}?" in confirm.locator("h1").inner_text()
    assert "Retry timeouts" in confirm.inner_text()  # it names exactly what changes
    page.fill("#confirm-reason", "timeouts skill made answers slower")
    screenshot("rollback-confirm")
    page.get_by_role("button", name=f"Roll back to v{good.number}").click()
    page.wait_for_url(f"**/versions/{good.number}/")
    screenshot("rolled-back")
    assert f"v{good.number} is active again" in page.locator("#flash").inner_text()

    assert _active(project).pk == good.pk
    assert PolicyVersion.objects.filter(project=project, status=VersionStatus.ACTIVE).count() == 1
    bad.refresh_from_db()
    assert bad.status == VersionStatus.RETIRED and bad.rolled_back_at is not None
    release = Release.objects.filter(project=project).order_by("-id").first()
    assert (release.kind, release.from_version, release.to_version, release.actor) == (
        ReleaseKind.ROLLBACK,
        bad,
        good,
        admin,
    )
    assert release.reason == "timeouts skill made answers slower"
    timeouts.refresh_from_db()
    dates.refresh_from_db()
    assert timeouts.rolled_back_at is not None and dates.rolled_back_at is None
    assert AuditEvent.objects.filter(
        project=project, action="skill_revision.rolled_back", actor=admin
    ).exists()
    assert page.js_errors == []
