"""The project settings page (admins only, audited, the upstream key write-only and encrypted
at rest, "Test connection" against a loopback OpenAI-compatible server) and the getting-started
panel of an empty project."""

from __future__ import annotations

import importlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.apps import apps as django_apps
from django.test import override_settings

from base import crypto, selectors, services, upstream_check
from base.errors import DomainError, PermissionDenied
from base.models import AuditEvent, Project
from incidents.models import Incident, Trajectory
from skills.runtime.upstream import upstream_for
from tests import factories
from tests.fakes.openai_server import OpenAIServer

pytestmark = pytest.mark.django_db

SECRET = "sk-upstream-secret-123"


@pytest.fixture
def admin(project):
    return factories.make_member(project, "admin")


@pytest.fixture
def upstream():
    with OpenAIServer(model="fake-model") as server:
        yield server


def settings_url(project, suffix: str = "") -> str:
    return f"/p/{project.slug}/settings/{suffix}"


def form_data(project, **overrides) -> dict:
    """What the page posts when nothing is touched, with ``overrides``."""
    project.refresh_from_db()
    data = {
        "name": project.name,
        "upstream_base_url": project.upstream_base_url,
        "upstream_api_key": "",
        "upstream_model_map": json.dumps(project.upstream_model_map or {}),
        "group_merge_threshold": str(project.group_merge_threshold),
        "incidental_tools": project.incidental_tools,
        "approval_link_ttl_hours": str(project.approval_link_ttl_hours),
        "llm_daily_token_budget": str(project.llm_daily_token_budget),
        "rate_limit_per_minute": str(project.rate_limit_per_minute or ""),
    }
    if project.require_second_approver:
        data["require_second_approver"] = "on"
    if project.approval_links_require_login:
        data["approval_links_require_login"] = "on"
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def audit_events(project):
    return AuditEvent.objects.filter(project=project, action="project.settings.update")


# --- Who may see the page ---------------------------------------------------------------------


def test_the_settings_page_needs_a_login(client, project):
    response = client.get(settings_url(project))
    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.parametrize("role", ["viewer", "reviewer"])
def test_viewers_and_reviewers_get_403_and_change_nothing(client, project, role):
    client.force_login(factories.make_member(project, role))
    assert client.get(settings_url(project)).status_code == 403
    response = client.post(settings_url(project), form_data(project, name="Taken over"))
    assert response.status_code == 403
    assert client.post(settings_url(project, "test-connection/"), {}).status_code == 403
    project.refresh_from_db()
    assert project.name != "Taken over"
    assert not audit_events(project).exists()


def test_a_member_of_another_project_gets_404(client, project, other_project):
    client.force_login(factories.make_member(other_project, "admin"))
    assert client.get(settings_url(project)).status_code == 404


def test_admins_see_the_page_linked_from_the_nav_and_viewers_do_not(client, project, admin):
    client.force_login(admin)
    page = client.get(settings_url(project)).content.decode()
    assert "Project settings" in page
    assert 'id="upstream-key-state">(not set)' in page
    assert f'href="/p/{project.slug}/integrations/"' in page  # linked, not duplicated
    assert "slack_webhook_url" not in page
    nav = client.get(f"/p/{project.slug}/audit/").content.decode()
    assert f'href="/p/{project.slug}/settings/"' in nav

    client.force_login(factories.make_member(project, "viewer"))
    nav = client.get(f"/p/{project.slug}/audit/").content.decode()
    assert f'href="/p/{project.slug}/settings/"' not in nav


# --- Saving -----------------------------------------------------------------------------------


def test_an_admin_saves_every_setting_and_the_audit_log_has_before_and_after(
    client, project, admin
):
    client.force_login(admin)
    data = form_data(
        project,
        name="Support agents",
        upstream_base_url="https://llm.example.com/v1/",
        upstream_api_key=SECRET,
        upstream_model_map='{"gpt-4o-mini": "my-deployment", "*": "fallback"}',
        group_merge_threshold="0.7",
        incidental_tools="lookup_faq\n  handoff_*  \n\nlookup_faq",
        require_second_approver="on",
        approval_link_ttl_hours="24",
        approval_links_require_login="on",
        llm_daily_token_budget="50000",
        rate_limit_per_minute="120",
    )
    with override_settings(METACLAW_ALLOW_PRIVATE_WEBHOOKS=True):  # no DNS in tests
        response = client.post(settings_url(project), data)

    assert response.status_code == 302, response.content.decode()[:2000]
    project.refresh_from_db()
    assert project.name == "Support agents"
    assert project.upstream_base_url == "https://llm.example.com/v1"
    assert project.upstream_model_map == {"gpt-4o-mini": "my-deployment", "*": "fallback"}
    assert project.group_merge_threshold == 0.7
    assert project.incidental_tools == "lookup_faq\nhandoff_*"
    assert project.require_second_approver and project.approval_links_require_login
    assert project.approval_link_ttl_hours == 24
    assert project.llm_daily_token_budget == 50000
    assert project.rate_limit_per_minute == 120
    # Encrypted at rest, readable through the one accessor, and what the proxy sends.
    assert project.upstream_api_key.startswith(crypto.PREFIX)
    assert SECRET not in project.upstream_api_key
    assert selectors.project_upstream_api_key(project) == SECRET
    assert upstream_for(project).api_key == SECRET

    event = audit_events(project).get()
    assert event.actor == admin
    assert event.before["name"] != "Support agents"
    assert event.after["name"] == "Support agents"
    assert event.after["upstream_base_url"] == "https://llm.example.com/v1"
    assert event.before["rate_limit_per_minute"] is None
    assert event.after["rate_limit_per_minute"] == 120
    assert event.before["upstream_api_key"] == "not set"
    assert event.after["upstream_api_key"] == "set"
    assert SECRET not in json.dumps([event.before, event.after, event.message])

    page = client.get(settings_url(project)).content.decode()
    assert 'id="upstream-key-state">(set)' in page
    assert SECRET not in page and project.upstream_api_key not in page
    assert "Settings saved." in page


def test_an_empty_key_field_keeps_the_key_and_clear_removes_it(client, project, admin):
    services.project_settings_update(
        project=project, changes={"upstream_api_key": SECRET}, actor=None
    )
    client.force_login(admin)

    assert client.post(settings_url(project), form_data(project, name="Renamed")).status_code == 302
    project.refresh_from_db()
    assert selectors.project_upstream_api_key(project) == SECRET
    assert "upstream_api_key" not in audit_events(project).first().after

    data = form_data(project, upstream_api_key_clear="on")
    assert client.post(settings_url(project), data).status_code == 302
    project.refresh_from_db()
    assert project.upstream_api_key == ""
    event = audit_events(project).first()
    assert (event.before["upstream_api_key"], event.after["upstream_api_key"]) == ("set", "not set")


def test_a_new_key_replaces_the_old_and_is_audited_as_changed(project):
    services.project_settings_update(
        project=project, changes={"upstream_api_key": "k1"}, actor=None
    )
    services.project_settings_update(
        project=project, changes={"upstream_api_key": "k2"}, actor=None
    )
    project.refresh_from_db()
    assert selectors.project_upstream_api_key(project) == "k2"
    event = audit_events(project).first()
    assert (event.before, event.after) == (
        {"upstream_api_key": "set"},
        {"upstream_api_key": "changed"},
    )


def test_typing_a_key_and_ticking_clear_is_refused_on_the_key_field(client, project, admin):
    client.force_login(admin)
    data = form_data(project, upstream_api_key=SECRET, upstream_api_key_clear="on")
    response = client.post(settings_url(project), data)
    assert response.status_code == 422
    assert "Upstream API key: Type a new key or clear the stored one" in response.content.decode()
    project.refresh_from_db()
    assert project.upstream_api_key == ""
    assert SECRET not in response.content.decode()  # a refused form does not echo the key


@pytest.mark.parametrize(
    ("field", "value", "label", "words"),
    [
        ("upstream_model_map", "{not json", "Upstream model map", "Not valid JSON"),
        ("upstream_model_map", '["a"]', "Upstream model map", "a JSON object"),
        ("upstream_model_map", '{"gpt-4o": 3}', "Upstream model map", "maps to 3"),
        ("group_merge_threshold", "1.5", "Group merge threshold", "less than or equal to 1"),
        ("upstream_base_url", "ftp://x.example", "Upstream base URL", "not an http(s) URL"),
        ("approval_link_ttl_hours", "0", "Approval links expire after (hours)", "greater than"),
        ("incidental_tools", "two words", "Incidental tools", "not a tool name"),
        ("name", "  ", "Name", "required"),
    ],
)
def test_a_bad_value_is_refused_on_its_field_and_changes_nothing(
    client, project, admin, field, value, label, words
):
    client.force_login(admin)
    before = Project.objects.values().get(pk=project.pk)
    response = client.post(settings_url(project), form_data(project, **{field: value}))
    assert response.status_code == 422
    page = response.content.decode()
    assert f"{label}: " in page and words in page, page[:3000]
    assert 'aria-invalid="true"' in page
    assert Project.objects.values().get(pk=project.pk) == before
    assert not audit_events(project).exists()


def test_saving_without_a_change_records_nothing(client, project, admin):
    client.force_login(admin)
    assert client.post(settings_url(project), form_data(project)).status_code == 302
    assert not audit_events(project).exists()


def test_the_stored_key_is_not_carried_to_another_host_without_typing_it_again(project):
    services.project_settings_update(
        project=project,
        changes={"upstream_base_url": "http://127.0.0.1:9/v1", "upstream_api_key": SECRET},
        actor=None,
    )
    with pytest.raises(DomainError) as refused:
        services.project_settings_update(
            project=project, changes={"upstream_base_url": "http://127.0.0.2:9/v1"}, actor=None
        )
    assert refused.value.field == "upstream_api_key"
    project.refresh_from_db()
    assert project.upstream_base_url == "http://127.0.0.1:9/v1"

    # Another path on the same host keeps it; typing it again (or clearing it) moves it.
    services.project_settings_update(
        project=project, changes={"upstream_base_url": "http://127.0.0.1:9/openai/v1"}, actor=None
    )
    services.project_settings_update(
        project=project,
        changes={"upstream_base_url": "http://127.0.0.2:9/v1", "upstream_api_key": SECRET},
        actor=None,
    )
    project.refresh_from_db()
    assert project.upstream_base_url == "http://127.0.0.2:9/v1"
    assert selectors.project_upstream_api_key(project) == SECRET


@override_settings(METACLAW_ALLOW_PRIVATE_WEBHOOKS=False)
def test_a_person_cannot_point_the_upstream_at_a_private_address(client, project, admin):
    client.force_login(admin)
    data = form_data(project, upstream_base_url="http://169.254.169.254/v1")
    response = client.post(settings_url(project), data)
    assert response.status_code == 422
    assert "Upstream base URL: " in response.content.decode()
    project.refresh_from_db()
    assert project.upstream_base_url == ""


def test_the_service_refuses_a_non_admin_and_an_unknown_setting(project):
    reviewer = factories.make_member(project, "reviewer")
    with pytest.raises(PermissionDenied):
        services.project_settings_update(
            project=project, changes={"name": "Mine now"}, actor=reviewer
        )
    with pytest.raises(DomainError) as refused:
        services.project_settings_update(
            project=project, changes={"slack_webhook_url": "https://x"}, actor=None
        )
    assert refused.value.field == "slack_webhook_url"
    project.refresh_from_db()
    assert project.name != "Mine now"
    assert not audit_events(project).exists()


# --- Encryption at rest -----------------------------------------------------------------------


def test_secrets_round_trip_and_old_plaintext_still_reads():
    token = crypto.encrypt(SECRET)
    assert token.startswith(crypto.PREFIX) and SECRET not in token
    assert crypto.encrypt(SECRET) != token  # a fresh IV every time
    assert crypto.decrypt(token) == SECRET
    assert crypto.decrypt("legacy-plaintext") == "legacy-plaintext"
    assert crypto.encrypt("") == "" and crypto.decrypt("") == ""


def test_a_rotated_secret_key_reads_old_values_only_with_a_fallback(settings):
    token = crypto.encrypt(SECRET)
    old_key = settings.SECRET_KEY
    settings.SECRET_KEY = "a-new-secret-key-for-this-test-0123456789"
    with pytest.raises(crypto.SecretUnreadable):
        crypto.decrypt(token)
    settings.SECRET_KEY_FALLBACKS = [old_key]
    assert crypto.decrypt(token) == SECRET


def test_an_unreadable_key_counts_as_none_and_the_page_says_so(client, project, admin, settings):
    services.project_settings_update(
        project=project, changes={"upstream_api_key": SECRET}, actor=None
    )
    project.refresh_from_db()
    settings.SECRET_KEY = "a-new-secret-key-for-this-test-0123456789"
    assert selectors.project_upstream_api_key(project) == ""
    assert upstream_for(project).api_key == ""
    client.force_login(admin)
    page = client.get(settings_url(project)).content.decode()
    assert "cannot be decrypted" in page
    # Clearing it works even though it cannot be read.
    data = form_data(project, upstream_api_key_clear="on")
    assert client.post(settings_url(project), data).status_code == 302
    project.refresh_from_db()
    assert project.upstream_api_key == ""


def test_the_migration_encrypts_plaintext_keys_and_leaves_encrypted_ones(project, other_project):
    Project.objects.filter(pk=project.pk).update(upstream_api_key="plain-key")
    token = crypto.encrypt("already")
    Project.objects.filter(pk=other_project.pk).update(upstream_api_key=token)
    migration = importlib.import_module("base.migrations.0003_encrypt_upstream_api_key")

    migration.encrypt_keys(django_apps, None)

    project.refresh_from_db()
    other_project.refresh_from_db()
    assert crypto.is_encrypted(project.upstream_api_key)
    assert selectors.project_upstream_api_key(project) == "plain-key"
    assert other_project.upstream_api_key == token
    migration.decrypt_keys(django_apps, None)
    project.refresh_from_db()
    assert project.upstream_api_key == "plain-key"


# --- Test connection --------------------------------------------------------------------------


class _Answer(BaseHTTPRequestHandler):
    status = 401
    body = b'{"error": {"message": "Incorrect API key provided"}}'
    delay = 0.0

    def do_GET(self) -> None:  # noqa: N802
        time.sleep(self.delay)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def answering():
    """A loopback server answering every GET with ``handler``'s status and body."""
    servers = []

    def start(**attrs) -> str:
        handler = type("Handler", (_Answer,), attrs)
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_test_connection_with_the_stored_settings_lists_the_models(
    client, project, admin, upstream
):
    services.project_settings_update(
        project=project,
        changes={"upstream_base_url": upstream.base_url, "upstream_api_key": SECRET},
        actor=None,
    )
    client.force_login(admin)
    data = form_data(project)
    response = client.post(settings_url(project, "test-connection/"), data, HTTP_HX_REQUEST="true")

    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="upstream-test"')  # the partial only
    assert "Connection works." in html and "<code>fake-model</code>" in html
    assert "with a key" in html
    assert upstream.requests[-1].path == "/v1/models"
    assert upstream.requests[-1].headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in html


def test_test_connection_uses_typed_values_and_saves_nothing(client, project, admin, upstream):
    client.force_login(admin)
    data = form_data(project, upstream_base_url=upstream.base_url, upstream_api_key="typed-key")
    response = client.post(settings_url(project, "test-connection/"), data)

    assert response.status_code == 200  # a plain POST: the whole page, with the result
    html = response.content.decode()
    assert "<h1>Project settings</h1>" in html and "Connection works." in html
    assert f'value="{upstream.base_url}"' in html and "typed-key" not in html
    assert upstream.requests[-1].headers["Authorization"] == "Bearer typed-key"
    project.refresh_from_db()
    assert project.upstream_base_url == "" and project.upstream_api_key == ""
    assert not audit_events(project).exists()


def test_test_connection_never_sends_the_stored_key_to_another_host(
    client, project, admin, upstream, answering
):
    services.project_settings_update(
        project=project,
        changes={
            "upstream_base_url": answering(status=200, body=b"{}"),
            "upstream_api_key": SECRET,
        },
        actor=None,
    )
    client.force_login(admin)
    data = form_data(project, upstream_base_url=upstream.base_url)
    html = client.post(settings_url(project, "test-connection/"), data).content.decode()

    assert "without a key" in html and "The stored key was not sent" in html
    assert "Authorization" not in upstream.requests[-1].headers


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"status": 401}, "The upstream refused the key (401 Unauthorized): Incorrect API key"),
        ({"status": 404, "body": b"not here"}, "(404): the base URL is where the OpenAI API"),
        ({"status": 500, "body": b"boom"}, "answered 500 Internal Server Error: boom"),
        ({"status": 200, "body": b"<html>hi</html>"}, "not with an OpenAI model list"),
        ({"status": 200, "delay": 1.0}, "No answer from 127.0.0.1"),
    ],
)
def test_test_connection_says_what_went_wrong(
    client, project, admin, answering, monkeypatch, attrs, words
):
    monkeypatch.setattr(upstream_check, "UPSTREAM_CHECK_TIMEOUT", 0.3)
    client.force_login(admin)
    data = form_data(project, upstream_base_url=answering(**attrs), upstream_api_key="k")
    response = client.post(settings_url(project, "test-connection/"), data, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert "Connection failed." in html and words in html, html


def test_test_connection_without_a_listener_or_an_upstream_says_so(project, admin, settings):
    settings.UPSTREAM = {**settings.UPSTREAM, "BASE_URL": "", "API_KEY": ""}
    closed = upstream_check.project_upstream_check(
        project=project, actor=admin, base_url="http://127.0.0.1:1/v1", api_key=""
    )
    assert not closed.ok and closed.message.startswith("Could not connect to 127.0.0.1:1")
    nothing = upstream_check.project_upstream_check(
        project=project, actor=admin, base_url="", api_key=""
    )
    assert not nothing.ok and "No upstream is set" in nothing.message


# --- Getting started --------------------------------------------------------------------------


def onboarding_url(project, part: str = "") -> str:
    return f"/p/{project.slug}/onboarding/" + (f"?part={part}" if part else "")


@override_settings(METACLAW_PUBLIC_URL="https://metaclaw.example.com")
def test_an_empty_project_shows_the_panel_with_its_real_urls(client, project, admin):
    client.force_login(admin)
    home = client.get(f"/p/{project.slug}/review/").content.decode()
    assert 'id="onboarding-slot"' in home and "?part=panel" in home

    html = client.get(onboarding_url(project, "panel"), HTTP_HX_REQUEST="true").content.decode()
    assert 'id="onboarding-base-url">https://metaclaw.example.com/v1<' in html
    assert 'base_url="https://metaclaw.example.com/v1"' in html
    assert "curl https://metaclaw.example.com/v1/chat/completions" in html
    assert "https://metaclaw.example.com/api/v1/incidents" in html
    assert f"/p/{project.slug}/keys/?name=agent&amp;scopes=runtime&amp;scopes=ingest" in html
    assert f'href="/p/{project.slug}/settings/"' in html
    assert "Waiting for the first proxied request" in html
    assert "Waiting for the first incident" in html
    assert 'hx-trigger="every 3s"' in html


def test_a_viewer_sees_the_panel_without_admin_links(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    html = client.get(onboarding_url(project, "panel")).content.decode()
    assert "Ask an admin" in html
    assert "/keys/" not in html and "/settings/" not in html


def test_the_key_link_fills_in_the_key_form(client, project, admin):
    client.force_login(admin)
    page = client.get(f"/p/{project.slug}/keys/?name=agent&scopes=runtime&scopes=ingest")
    html = page.content.decode()
    assert 'value="agent"' in html
    assert 'value="runtime" checked' in html and 'value="ingest" checked' in html
    assert 'value="admin" checked' not in html


def test_the_states_turn_done_with_links_and_polling_stops(client, api, project, admin):
    client.force_login(admin)
    key = factories.make_key(project, scopes=["ingest"])
    status = client.get(onboarding_url(project, "status")).content.decode()
    assert status.count("badge-waiting") == 2

    response = api.post("/api/v1/incidents", factories.incident_payload("first"), key)
    assert response.status_code in (200, 201, 202), response.content
    group_id = Incident.objects.get(project=project).group_id
    status = client.get(onboarding_url(project, "status")).content.decode()
    assert "First incident received" in status
    assert f'href="/p/{project.slug}/groups/{group_id}/"' in status
    assert "Waiting for the first proxied request" in status and "every 3s" in status

    Trajectory.objects.create(project=project, source="proxy", model="gpt-test", status_code=200)
    status = client.get(onboarding_url(project, "status")).content.decode()
    assert "First proxied request received" in status and "gpt-test" in status
    assert "every 3s" not in status  # complete: nothing left to wait for
    assert "Your agent is connected." in status


def test_the_panel_is_gone_once_an_agent_has_reported_anything(client, project, admin):
    Trajectory.objects.create(project=project, source="api")
    client.force_login(admin)
    response = client.get(onboarding_url(project, "panel"), HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and response.content == b""
    # The page itself stays reachable.
    assert "Connect your first agent" in client.get(onboarding_url(project)).content.decode()


def test_the_risk_checks_allowed_domains_are_set_on_the_settings_page(client, project, admin):
    client.force_login(admin)
    data = form_data(project, risk_allowed_domains="*.Example.com\ndocs.acme.io\n")
    assert client.post(settings_url(project), data).status_code == 302
    project.refresh_from_db()
    assert project.risk_allowed_domains == "example.com\ndocs.acme.io"
    bad = client.post(settings_url(project), {**data, "risk_allowed_domains": "not a domain"})
    assert bad.status_code == 422
    assert "is not a domain name" in bad.content.decode()
    project.refresh_from_db()
    assert project.risk_allowed_domains == "example.com\ndocs.acme.io"
