"""In a real browser: the first hour of a new team. From an empty project, the getting-started
panel leads to Project settings (upstream, test connection), a key, and the panel's waiting
states turn to done when the agent's first proxied request and first incident arrive."""

from __future__ import annotations

import httpx
import openai
import pytest

from base import selectors
from base.models import AuditEvent
from skills.runtime import recording
from tests import factories
from tests.fakes.openai_server import OpenAIServer, Reply

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

UPSTREAM_KEY = "sk-upstream-for-browser-test"


@pytest.fixture
def upstream():
    with OpenAIServer(default=Reply(content="Hello from the upstream"), model="fake-model") as srv:
        yield srv
    recording.recordings_wait(5)


def test_a_new_team_goes_from_an_empty_project_to_a_first_request_and_incident(
    page, project, person, log_in, live_server, settings, upstream, screenshot
):
    # The snippets carry the site's public address: here, the live server's.
    settings.METACLAW_PUBLIC_URL = live_server.url
    person("admin", "ada")

    log_in("ada")
    panel = page.locator("#onboarding")
    panel.wait_for()
    assert "Waiting for the first proxied request" in panel.inner_text()
    assert "Waiting for the first incident" in panel.inner_text()
    base_url = page.locator("#onboarding-base-url").inner_text()
    incidents_url = page.locator("#snippet-incident").inner_text().split()[3]
    assert base_url == f"{live_server.url}/v1"
    assert f'base_url="{base_url}"' in page.locator("#snippet-python").inner_text()
    screenshot("empty-project-panel")

    # Project settings: the upstream, tested before it is saved.
    panel.get_by_role("link", name="Project settings").click()
    page.wait_for_url(f"**/p/{project.slug}/settings/")
    assert page.locator("#upstream-key-state").inner_text() == "(not set)"
    page.fill("#id_upstream_base_url", upstream.base_url)
    page.fill("#id_upstream_api_key", UPSTREAM_KEY)
    page.get_by_role("button", name="Test connection").click()
    result = page.locator("#upstream-test")
    result.get_by_text("Connection works.").wait_for()
    assert "fake-model" in result.inner_text()
    assert upstream.requests[-1].path == "/v1/models"
    assert upstream.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    screenshot("test-connection")
    with page.expect_navigation():
        page.get_by_role("button", name="Save settings").click()
    assert "Settings saved." in page.locator("#flash").inner_text()
    assert page.locator("#upstream-key-state").inner_text() == "(set)"
    assert page.locator("#id_upstream_api_key").input_value() == ""  # write-only
    project.refresh_from_db()
    assert project.upstream_base_url == upstream.base_url
    assert UPSTREAM_KEY not in project.upstream_api_key  # encrypted at rest
    assert selectors.project_upstream_api_key(project) == UPSTREAM_KEY
    assert AuditEvent.objects.filter(project=project, action="project.settings.update").exists()

    # A key, from the panel's link: the form comes filled in.
    page.goto(f"/p/{project.slug}/review/")
    panel.get_by_role("link", name="Create an API key").click()
    page.wait_for_url(f"**/p/{project.slug}/keys/**")
    assert page.locator("#key-name").input_value() == "agent"
    with page.expect_navigation():
        page.get_by_role("button", name="Create key").click()
    key = page.locator("#new-secret").inner_text().strip()
    assert key.startswith("mc_")

    # Back on the home page, the panel waits; the agent connects as the snippets say.
    page.goto(f"/p/{project.slug}/review/")
    status = page.locator("#onboarding-status")
    status.get_by_text("Waiting for the first proxied request").wait_for()
    screenshot("waiting")

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Where is my order?"}]
    )
    assert reply.choices[0].message.content == "Hello from the upstream"
    sent = {k.lower(): v for k, v in upstream.chat_requests()[-1].headers.items()}
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"  # the stored key, decrypted
    page.locator('[data-step="proxied"].step-done').wait_for()
    assert "First proxied request received" in status.inner_text()

    response = httpx.post(
        incidents_url,
        headers={"Authorization": f"Bearer {key}"},
        json=factories.incident_payload("first-incident"),
        timeout=20,
    )
    assert response.status_code in (200, 201, 202), response.text
    page.locator('[data-step="incident"].step-done').wait_for()
    assert "Your agent is connected." in status.inner_text()
    screenshot("connected")

    status.get_by_role("link", name="See its group").click()
    page.wait_for_url(f"**/p/{project.slug}/groups/*/")
    assert page.js_errors == []
