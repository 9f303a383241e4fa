"""The project administration pages: audit log, API keys, members."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from base import services
from base.models import ApiKey, AuditEvent, Membership
from tests import factories

pytestmark = pytest.mark.django_db


def _events(project, n: int, *, action: str = "demo.thing", actor_label: str = "robot") -> None:
    for i in range(n):
        services.audit_record(
            action=action,
            project=project,
            actor_label=actor_label,
            after={"i": i},
            message=f"event {i}",
        )


# --- Role checks and tenancy ------------------------------------------------------------------


@pytest.mark.parametrize("page", ["audit/", "keys/", "members/"])
def test_pages_need_a_login(client, project, page):
    response = client.get(f"/p/{project.slug}/{page}")
    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.parametrize("page", ["audit/", "keys/", "members/"])
def test_a_member_of_another_project_gets_404_for_every_page(client, project, other_project, page):
    client.force_login(factories.make_member(other_project, "admin"))
    assert client.get(f"/p/{project.slug}/{page}").status_code == 404


def test_an_unknown_project_looks_the_same_as_a_foreign_one(client, project):
    client.force_login(factories.make_member(project, "admin"))
    assert client.get("/p/no-such-project/audit/").status_code == 404


@pytest.mark.parametrize("role", ["viewer", "reviewer"])
@pytest.mark.parametrize("page", ["keys/", "members/"])
def test_keys_and_members_pages_refuse_non_admins_with_403(client, project, role, page):
    client.force_login(factories.make_member(project, role))
    response = client.get(f"/p/{project.slug}/{page}")
    assert response.status_code == 403
    assert "admin role" in response.content.decode()


def test_a_viewer_reads_the_audit_log_but_sees_no_admin_links(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(f"/p/{project.slug}/audit/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "Audit log" in html
    assert f"/p/{project.slug}/keys/" not in html


def test_a_viewer_cannot_create_or_revoke_keys(client, project):
    issued = services.api_key_create(project=project, name="ci", scopes=["ingest"])
    client.force_login(factories.make_member(project, "reviewer"))

    created = client.post(f"/p/{project.slug}/keys/create/", {"name": "x", "scopes": ["ingest"]})
    revoked = client.post(f"/p/{project.slug}/keys/{issued.api_key.pk}/revoke/")

    assert (created.status_code, revoked.status_code) == (403, 403)
    assert ApiKey.objects.filter(project=project).count() == 1
    assert ApiKey.objects.get().revoked_at is None


def test_an_admin_cannot_revoke_another_projects_key(client, project, other_project):
    foreign = services.api_key_create(project=other_project, name="theirs", scopes=["ingest"])
    client.force_login(factories.make_member(project, "admin"))

    response = client.post(f"/p/{project.slug}/keys/{foreign.api_key.pk}/revoke/")

    assert response.status_code == 404
    assert ApiKey.objects.get(pk=foreign.api_key.pk).revoked_at is None


def test_an_admin_cannot_change_a_member_of_another_project(client, project, other_project):
    outsider = factories.make_member(other_project, "viewer")
    client.force_login(factories.make_member(project, "admin"))

    changed = client.post(f"/p/{project.slug}/members/{outsider.pk}/role/", {"role": "admin"})
    removed = client.post(f"/p/{project.slug}/members/{outsider.pk}/remove/")

    assert (changed.status_code, removed.status_code) == (404, 404)
    assert Membership.objects.get(user=outsider).role == "viewer"


# --- Audit log ----------------------------------------------------------------------------------


def test_audit_log_lists_the_projects_events_newest_first_and_not_other_projects(
    client, project, other_project
):
    _events(project, 3)
    _events(other_project, 2, action="secret.other")
    client.force_login(factories.make_member(project, "viewer"))

    html = client.get(f"/p/{project.slug}/audit/").content.decode()

    assert html.index("event 2") < html.index("event 1") < html.index("event 0")
    assert "secret.other" not in html


def test_audit_log_filters_by_action_actor_object_type_and_time(client, project):
    admin = factories.make_member(project, "admin", username="alice")
    _events(project, 2, action="demo.alpha", actor_label="robot")
    services.api_key_create(project=project, name="ci-key", scopes=["ingest"], actor=admin)
    old = AuditEvent.objects.create(
        project=project,
        action="demo.ancient",
        actor_label="robot",
        created_at=timezone.now() - timedelta(days=10),
    )
    client.force_login(admin)
    url = f"/p/{project.slug}/audit/"

    by_action = client.get(url, {"action": "api_key.create"}).context["rows"]
    by_family = client.get(url, {"action": "demo."}).context["rows"]
    by_actor = client.get(url, {"actor": "ALI"}).context["rows"]
    by_type = client.get(url, {"object_type": "metaclaw_site.apikey"}).context["rows"]
    recent = client.get(url, {"since": (timezone.now() - timedelta(days=1)).date().isoformat()})
    older = client.get(url, {"until": (timezone.now() - timedelta(days=5)).date().isoformat()})

    assert [r["event"].object_repr for r in by_action] == ["ci-key (" + _prefix(project) + "…)"]
    assert {r["event"].action for r in by_family} == {"demo.alpha", "demo.ancient"}
    assert {r["event"].actor_label for r in by_actor} == {"alice"}
    assert [r["event"].action for r in by_type] == ["api_key.create"]
    assert old.pk not in {r["event"].pk for r in recent.context["rows"]}
    assert [r["event"].pk for r in older.context["rows"]] == [old.pk]


def _prefix(project) -> str:
    return ApiKey.objects.get(project=project).prefix


def test_audit_log_refuses_a_bad_date_naming_the_field(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(f"/p/{project.slug}/audit/", {"since": "yesterday-ish"})
    assert response.status_code == 400
    html = response.content.decode()
    assert "<strong>since</strong>" in html and "is not a date" in html


def test_audit_log_refuses_a_forged_cursor(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(f"/p/{project.slug}/audit/", {"cursor": "bm90LWpzb24"})
    assert response.status_code == 400
    assert "cursor" in response.content.decode()


def test_audit_log_pages_with_a_cursor_that_keeps_the_filters(client, project):
    _events(project, 60, action="demo.many")
    _events(project, 5, action="demo.other")
    client.force_login(factories.make_member(project, "viewer"))

    first = client.get(f"/p/{project.slug}/audit/", {"action": "demo.many"})
    assert len(first.context["rows"]) == 50
    next_url = first.context["next_url"]
    assert "action=demo.many" in next_url
    second = client.get(f"/p/{project.slug}/audit/{next_url}")

    seen = [r["event"].pk for r in first.context["rows"] + second.context["rows"]]
    expected = list(
        AuditEvent.objects.filter(project=project, action="demo.many")
        .order_by("-created_at", "-id")
        .values_list("pk", flat=True)
    )
    assert seen == expected
    assert second.context["next_url"] == ""


def test_audit_log_htmx_request_gets_only_the_table(client, project):
    _events(project, 2)
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(f"/p/{project.slug}/audit/", {"actor": "robot"}, HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="audit-table">')
    assert "<html" not in html
    assert "event 1" in html


def test_audit_log_query_count_does_not_grow_with_data(client, project, page_queries_do_not_grow):
    _events(project, 2)
    client.force_login(factories.make_member(project, "viewer"))

    def add_events():
        user = factories.make_user()
        for i in range(60):
            services.audit_record(action=f"demo.kind{i % 7}", project=project, actor=user, obj=user)

    response = page_queries_do_not_grow(f"/p/{project.slug}/audit/", 7, add_events)
    assert len(response.context["rows"]) == 50


# --- API keys -----------------------------------------------------------------------------------


def test_creating_a_key_shows_the_secret_once_and_stores_only_its_hash(client, project):
    client.force_login(factories.make_member(project, "admin"))

    response = client.post(
        f"/p/{project.slug}/keys/create/", {"name": "support-bot", "scopes": ["ingest", "runtime"]}
    )

    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    secret = response.context["issued"].secret
    assert secret in response.content.decode()
    key = ApiKey.objects.get(project=project)
    assert (key.name, key.scopes) == ("support-bot", ["ingest", "runtime"])
    assert secret.startswith(f"mc_{key.prefix}_")
    assert secret not in key.hashed_secret and len(key.hashed_secret) == 64
    listing = client.get(f"/p/{project.slug}/keys/").content.decode()
    assert secret not in listing
    assert f"mc_{key.prefix}…" in listing


def test_creating_a_key_without_scopes_answers_422_naming_the_field(client, project):
    client.force_login(factories.make_member(project, "admin"))
    response = client.post(f"/p/{project.slug}/keys/create/", {"name": "x"})
    assert response.status_code == 422
    assert "scopes" in response.context["errors"]
    assert not ApiKey.objects.exists()


def test_revoking_a_key_marks_it_revoked_and_audits_it(client, project):
    admin = factories.make_member(project, "admin")
    issued = services.api_key_create(project=project, name="ci", scopes=["ingest"])
    client.force_login(admin)

    response = client.post(f"/p/{project.slug}/keys/{issued.api_key.pk}/revoke/")

    assert response.status_code == 302
    assert ApiKey.objects.get().revoked_at is not None
    event = AuditEvent.objects.get(action="api_key.revoke")
    assert event.actor == admin


def test_revoking_over_htmx_returns_the_table_and_a_second_revoke_answers_409(client, project):
    issued = services.api_key_create(project=project, name="ci", scopes=["ingest"])
    client.force_login(factories.make_member(project, "admin"))
    url = f"/p/{project.slug}/keys/{issued.api_key.pk}/revoke/"

    first = client.post(url, HTTP_HX_REQUEST="true")
    second = client.post(url, HTTP_HX_REQUEST="true")

    assert first.status_code == 200
    assert first.content.decode().lstrip().startswith('<div id="key-table">')
    assert "revoked" in first.content.decode()
    assert second.status_code == 409
    assert AuditEvent.objects.filter(action="api_key.revoke").count() == 1


def test_keys_page_query_count_does_not_grow_with_keys(client, project, page_queries_do_not_grow):
    admin = factories.make_member(project, "admin")
    services.api_key_create(project=project, name="k0", scopes=["ingest"], actor=admin)
    client.force_login(admin)

    def add_keys():
        for i in range(10):
            services.api_key_create(
                project=project, name=f"k{i + 1}", scopes=["ingest"], actor=admin
            )

    response = page_queries_do_not_grow(f"/p/{project.slug}/keys/", 6, add_keys)
    assert len(response.context["keys"]) == 11


# --- Members -------------------------------------------------------------------------------------


def test_an_admin_adds_changes_and_removes_a_member(client, project):
    admin = factories.make_member(project, "admin")
    bob = factories.make_user("bob")
    client.force_login(admin)
    base = f"/p/{project.slug}/members"

    assert client.post(f"{base}/add/", {"username": "bob", "role": "viewer"}).status_code == 302
    assert Membership.objects.get(project=project, user=bob).role == "viewer"
    assert client.post(f"{base}/{bob.pk}/role/", {"role": "reviewer"}).status_code == 302
    assert Membership.objects.get(project=project, user=bob).role == "reviewer"
    assert client.post(f"{base}/{bob.pk}/remove/").status_code == 302
    assert not Membership.objects.filter(project=project, user=bob).exists()
    actions = list(
        AuditEvent.objects.filter(project=project, actor=admin)
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == ["membership.set", "membership.set", "membership.remove"]


def test_adding_an_unknown_user_answers_422_naming_the_field(client, project):
    client.force_login(factories.make_member(project, "admin"))
    response = client.post(
        f"/p/{project.slug}/members/add/", {"username": "ghost", "role": "viewer"}
    )
    assert response.status_code == 422
    assert "username" in response.context["errors"]
    assert Membership.objects.filter(project=project).count() == 1


def test_the_last_admin_cannot_demote_or_remove_themselves(client, project):
    admin = factories.make_member(project, "admin")
    client.force_login(admin)

    demoted = client.post(f"/p/{project.slug}/members/{admin.pk}/role/", {"role": "viewer"})
    removed = client.post(f"/p/{project.slug}/members/{admin.pk}/remove/", follow=True)

    assert demoted.status_code == 302
    assert Membership.objects.get(project=project, user=admin).role == "admin"
    assert "at least one admin" in removed.content.decode()
    assert not AuditEvent.objects.filter(action="membership.remove").exists()


def test_an_admin_who_steps_down_is_sent_home(client, project):
    first = factories.make_member(project, "admin")
    factories.make_member(project, "admin")
    client.force_login(first)

    response = client.post(f"/p/{project.slug}/members/{first.pk}/role/", {"role": "viewer"})

    assert response.status_code == 302 and response["Location"] == "/"
    assert Membership.objects.get(project=project, user=first).role == "viewer"


def test_members_page_query_count_does_not_grow_with_members(
    client, project, page_queries_do_not_grow
):
    client.force_login(factories.make_member(project, "admin"))

    def add_members():
        for _ in range(8):
            factories.make_member(project, "viewer")

    response = page_queries_do_not_grow(f"/p/{project.slug}/members/", 6, add_members)
    assert len(response.context["memberships"]) == 9


def test_audit_log_over_htmx_names_a_bad_date_inside_the_table(client, project):
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(
        f"/p/{project.slug}/audit/", {"until": "31/12/2026"}, HTTP_HX_REQUEST="true"
    )
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="audit-table">')
    assert "<strong>until</strong>" in html


def test_audit_filter_menus_come_from_recent_events_and_keep_the_chosen_value(
    client, project, monkeypatch
):
    from base import selectors

    monkeypatch.setattr(selectors, "AUDIT_CHOICES_WINDOW", 3)
    client.force_login(factories.make_member(project, "viewer"))
    _events(project, 1, action="demo.old")
    _events(project, 3, action="demo.new")

    plain = client.get(f"/p/{project.slug}/audit/")
    chosen = client.get(f"/p/{project.slug}/audit/", {"action": "demo.old"})

    assert plain.context["actions"] == ["demo.new"]
    assert "demo.old" in chosen.context["actions"]
    assert [r["event"].action for r in chosen.context["rows"]] == ["demo.old"]
