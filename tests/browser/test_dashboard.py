"""In a real browser: log in, incident groups, API keys, members and the audit log."""

from __future__ import annotations

import hashlib
import json

import pytest

from base import services
from base.models import ApiKey, AuditEvent, Membership
from incidents.models import GroupStatus, IncidentGroup
from tests import factories

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _ingest(client, project, n_types: int = 2, per_type: int = 2) -> str:
    key = factories.make_key(project, scopes=["ingest"], name="ingest for tests")
    items = [
        factories.incident_payload(
            f"b-{t}-{i}", error={"type": f"Error{t}", "message": f"boom {t}"}
        )
        for t in range(n_types)
        for i in range(per_type)
    ]
    response = factories.ApiClient(client).post("/api/v1/incidents/batch", {"items": items}, key)
    assert response.status_code in (200, 202, 207), response.content
    return key


def test_a_person_logs_in_sees_the_groups_and_resolves_one(
    page, project, person, log_in, client, screenshot
):
    _ingest(client, project)
    reviewer = person("reviewer", "rita")

    log_in("rita")
    screenshot("after-login")

    assert "/login/" not in page.url
    assert page.locator(".whoami").inner_text().startswith("rita")
    reviewer.refresh_from_db()
    assert reviewer.last_login is not None

    page.get_by_role("link", name="Incidents", exact=True).click()
    page.wait_for_url(f"**/p/{project.slug}/groups/**")
    rows = page.locator("#group-table tbody tr")
    assert rows.count() == 2
    assert "Error0: boom 0" in page.locator("#group-table").inner_text()
    screenshot("groups")

    page.get_by_role("link", name="Error1: boom 1").click()
    page.wait_for_url("**/groups/*/")
    with page.expect_navigation():
        page.get_by_role("button", name="Resolve").click()
    screenshot("group-resolved")

    group = IncidentGroup.objects.get(title__startswith="Error1")
    assert group.status == GroupStatus.RESOLVED
    assert AuditEvent.objects.filter(
        action__startswith="incident_group", object_id=str(group.pk), actor=reviewer
    ).exists()
    assert IncidentGroup.objects.get(title__startswith="Error0").status == GroupStatus.UNRESOLVED
    assert page.js_errors == []


def test_a_wrong_password_keeps_the_person_out(page, project, person, log_in):
    person("viewer", "vic")

    log_in("vic", "not-the-password")

    assert "/login/" in page.url
    assert page.locator(".error").count() == 1
    page.goto(f"/p/{project.slug}/groups/")
    assert "/login/" in page.url


def test_a_member_of_another_project_gets_not_found(page, project, person, log_in):
    other = factories.make_project(name="Elsewhere")
    person("admin", "otto", in_project=other)

    log_in("otto")
    response = page.goto(f"/p/{project.slug}/audit/")

    assert response is not None and response.status == 404


def test_an_admin_creates_a_key_sees_the_secret_once_and_revokes_it(
    page, project, person, log_in, client, screenshot
):
    admin = person("admin", "ada")
    log_in("ada")

    page.get_by_role("link", name="API keys").click()
    page.wait_for_url(f"**/p/{project.slug}/keys/")
    page.fill("#key-name", "support-bot production")
    page.get_by_label("Ingest").check()
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-secret").inner_text().strip()
    screenshot("key-created")

    key = ApiKey.objects.get(project=project)
    assert key.name == "support-bot production" and key.scopes == ["ingest"]
    assert key.created_by == admin
    assert key.hashed_secret == hashlib.sha256(secret.encode()).hexdigest()
    assert secret.startswith(f"mc_{key.prefix}_")

    api = factories.ApiClient(client)
    used = api.post("/api/v1/incidents", factories.incident_payload("k1"), secret)
    assert used.status_code == 202

    page.goto(f"/p/{project.slug}/keys/")
    assert secret not in page.content()
    row = page.locator(f'tr[data-key-prefix="{key.prefix}"]')
    assert f"mc_{key.prefix}…" in row.inner_text()
    assert "never" not in row.inner_text()  # last used is shown now

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    page.locator(f'tr[data-key-prefix="{key.prefix}"] .badge-rejected').wait_for()
    screenshot("key-revoked")

    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.filter(action="api_key.revoke", actor=admin).count() == 1
    refused = api.post("/api/v1/incidents", factories.incident_payload("k2"), secret)
    assert refused.status_code == 401
    assert page.js_errors == []


def test_an_admin_changes_a_members_role(page, project, person, log_in, screenshot):
    person("admin", "ada")
    bob = person("viewer", "bob")
    log_in("ada")

    page.get_by_role("link", name="Members").click()
    page.wait_for_url(f"**/p/{project.slug}/members/")
    row = page.locator('tr[data-username="bob"]')
    row.get_by_label("Role of bob").select_option("reviewer")
    with page.expect_navigation():
        row.get_by_role("button", name="Save").click()
    screenshot("member-changed")

    assert Membership.objects.get(project=project, user=bob).role == "reviewer"
    assert "bob is now reviewer" in page.locator("#flash").inner_text()


def test_the_audit_log_filters_without_a_page_load(page, project, person, log_in, screenshot):
    admin = person("admin", "ada")
    for name in ("one", "two"):
        services.api_key_create(project=project, name=name, scopes=["ingest"], actor=admin)
    services.audit_record(action="demo.other", project=project, actor_label="robot")
    log_in("ada")

    page.get_by_role("link", name="Audit log").click()
    page.wait_for_url(f"**/p/{project.slug}/audit/")
    total = AuditEvent.objects.filter(project=project).count()
    assert page.locator("#audit-table tbody tr").count() == total
    page.evaluate("window.__sameDocument = true")

    page.select_option("#f-action", "api_key.create")
    page.wait_for_url("**action=api_key.create**")
    page.wait_for_function("document.querySelectorAll('#audit-table tbody tr').length === 2")
    screenshot("audit-filtered")

    texts = page.locator("#audit-table tbody tr").all_inner_texts()
    assert all("api_key.create" in t for t in texts)
    assert page.evaluate("window.__sameDocument") is True  # swapped by htmx, not reloaded
    row = page.locator("#audit-table tbody tr").first
    row.locator("summary").click()
    after = json.loads(row.locator("pre").last.inner_text())
    assert after["name"] == "two" and after["scopes"] == ["ingest"]


@pytest.mark.parametrize("path", ["audit/", "keys/", "members/"])
def test_the_admin_pages_fit_a_phone_screen(page, project, person, log_in, screenshot, path):
    admin = person("admin", "ada")
    person("viewer", "a-person-with-a-rather-long-username")
    services.api_key_create(project=project, name="a key", scopes=["ingest"], actor=admin)
    log_in("ada")
    page.set_viewport_size({"width": 390, "height": 844})

    page.goto(f"/p/{project.slug}/{path}")
    screenshot("phone")

    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1
    # The row actions stay reachable on a narrow screen.
    if path != "audit/":
        assert page.locator("tbody button").first.is_visible()
