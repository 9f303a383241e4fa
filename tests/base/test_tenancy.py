"""Tenancy through the public interfaces: API keys on the HTTP API, and the management
commands that set a project up."""

from __future__ import annotations

import hashlib
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from base import services
from base.errors import Conflict
from base.models import ApiKey, AuditEvent, Membership, Project
from incidents.models import Incident, IncidentGroup
from tests import factories

pytestmark = pytest.mark.django_db


# --- API keys --------------------------------------------------------------------------------


def test_a_new_key_stores_only_the_hash_and_shows_the_prefix(project):
    issued = services.api_key_create(project=project, name="bot", scopes=["ingest"])

    key = ApiKey.objects.get()
    assert key.hashed_secret == hashlib.sha256(issued.secret.encode()).hexdigest()
    stored = [str(v) for v in ApiKey.objects.values_list().get()]
    assert not any(issued.secret in value for value in stored)
    assert issued.secret.startswith(f"mc_{key.prefix}_")
    assert key.prefix in str(key)


def test_the_secret_cannot_be_read_back_after_creation(project):
    issued = services.api_key_create(project=project, name="bot", scopes=["ingest"])
    again = ApiKey.objects.get(pk=issued.api_key.pk)
    assert not hasattr(again, "secret")
    assert issued.secret not in repr(vars(again))


def test_a_request_without_a_key_answers_401(api, project):
    response = api.post("/api/v1/incidents", factories.incident_payload())
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized"
    assert not Incident.objects.exists()


@pytest.mark.parametrize(
    "secret", ["mc_deadbeef_not-the-real-one", "sk-something-else", "mc_", "mc_nounderscore"]
)
def test_an_unknown_or_malformed_key_answers_401(api, project, ingest_key, secret):
    response = api.post("/api/v1/incidents", factories.incident_payload(), key=secret)
    assert response.status_code == 401
    assert not Incident.objects.exists()


def test_a_key_with_the_right_prefix_but_a_wrong_secret_answers_401(api, project, ingest_key):
    forged = ingest_key[:-4] + ("AAAA" if not ingest_key.endswith("AAAA") else "BBBB")
    response = api.post("/api/v1/incidents", factories.incident_payload(), key=forged)
    assert response.status_code == 401


def test_a_revoked_key_answers_401(api, project, ingest_key):
    first = api.post("/api/v1/incidents", factories.incident_payload("a"), key=ingest_key)
    assert first.status_code == 202
    services.api_key_revoke(api_key=ApiKey.objects.get())

    response = api.post("/api/v1/incidents", factories.incident_payload("b"), key=ingest_key)

    assert response.status_code == 401
    assert list(Incident.objects.values_list("client_id", flat=True)) == ["a"]


def test_a_key_without_the_scope_answers_403(api, project):
    runtime_only = factories.make_key(project, scopes=["runtime"])

    response = api.post("/api/v1/incidents", factories.incident_payload(), key=runtime_only)

    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert "ingest" in response.json()["detail"]
    assert not Incident.objects.exists()


def test_an_ingest_key_cannot_use_admin_endpoints(api, project, ingest_key):
    api.post("/api/v1/incidents", factories.incident_payload(), key=ingest_key)
    group = IncidentGroup.objects.get()

    response = api.post(f"/api/v1/groups/{group.pk}/status", {"status": "resolved"}, key=ingest_key)

    assert response.status_code == 403
    assert IncidentGroup.objects.get().status == group.status


def test_a_key_over_its_projects_rate_limit_answers_429_with_retry_after(api, project):
    Project.objects.filter(pk=project.pk).update(rate_limit_per_minute=2)
    key = factories.make_key(project, scopes=["ingest"])

    # Counters are per minute; a minute boundary between requests resets the count, so allow
    # a few extra requests before the limit must bite.
    statuses = []
    for _attempt in range(6):
        response = api.get("/api/v1/incidents", key=key)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break

    assert statuses[:2] == [200, 200]
    assert statuses[-1] == 429
    assert 1 <= int(response["Retry-After"]) <= 60
    assert response.json()["code"] == "rate_limited"


def test_the_rate_limit_counts_each_key_separately(api, project):
    Project.objects.filter(pk=project.pk).update(rate_limit_per_minute=1)
    first = factories.make_key(project, scopes=["ingest"])
    second = factories.make_key(project, scopes=["ingest"])

    assert api.get("/api/v1/incidents", key=first).status_code == 200
    assert api.get("/api/v1/incidents", key=second).status_code == 200


def test_a_key_never_sees_another_projects_incidents(api, project, other_project, ingest_key):
    other_key = factories.make_key(other_project, scopes=["ingest"])
    theirs = api.post("/api/v1/incidents", factories.incident_payload("x"), key=other_key).json()
    mine = api.post("/api/v1/incidents", factories.incident_payload("y"), key=ingest_key).json()

    listed = api.get("/api/v1/incidents", key=ingest_key).json()["items"]
    one = api.get(f"/api/v1/incidents/{theirs['id']}", key=ingest_key)
    group = api.get(f"/api/v1/groups/{theirs['group_id']}", key=ingest_key)
    groups = api.get("/api/v1/groups", key=ingest_key).json()["items"]

    assert [item["id"] for item in listed] == [mine["id"]]
    assert one.status_code == 404
    assert group.status_code == 404
    assert [g["id"] for g in groups] == [mine["group_id"]]


def test_the_same_client_id_in_two_projects_makes_two_incidents(api, project, other_project):
    key_a = factories.make_key(project, scopes=["ingest"])
    key_b = factories.make_key(other_project, scopes=["ingest"])

    a = api.post("/api/v1/incidents", factories.incident_payload("same"), key=key_a)
    b = api.post("/api/v1/incidents", factories.incident_payload("same"), key=key_b)

    assert (a.status_code, b.status_code) == (202, 202)
    assert Incident.objects.filter(client_id="same").count() == 2
    assert {i.project_id for i in Incident.objects.all()} == {project.pk, other_project.pk}


def test_using_a_key_stamps_last_used(api, project, ingest_key):
    assert ApiKey.objects.get().last_used_at is None
    api.get("/api/v1/incidents", key=ingest_key)
    assert ApiKey.objects.get().last_used_at is not None


# --- Management commands ------------------------------------------------------------------------


def _call(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_create_project_makes_the_owner_admin(db):
    owner = factories.make_user("owner")

    output = _call("create_project", "Support agents", "--owner", "owner")

    project = Project.objects.get(slug="support-agents")
    assert "support-agents" in output
    assert Membership.objects.get(project=project, user=owner).role == "admin"
    assert AuditEvent.objects.filter(project=project, action="project.create").exists()


def test_create_project_refuses_a_taken_slug(project):
    with pytest.raises(CommandError, match="exists already"):
        _call("create_project", "Again", "--slug", project.slug)
    assert Project.objects.count() == 1


def test_add_member_creates_the_user_when_given_a_password(project):
    _call("add_member", project.slug, "carol", "--role", "reviewer", "--password", "pw-12345678")

    membership = Membership.objects.get(project=project, user__username="carol")
    assert membership.role == "reviewer"
    assert membership.user.check_password("pw-12345678")


def test_add_member_refuses_an_unknown_user_without_password(project):
    with pytest.raises(CommandError, match="pass --password"):
        _call("add_member", project.slug, "nobody")
    assert not Membership.objects.filter(project=project).exists()


def test_create_api_key_prints_a_working_secret_once(api, project):
    secret = _call("create_api_key", project.slug, "cli key", "--scope", "ingest").strip()

    key = ApiKey.objects.get(project=project)
    assert key.scopes == ["ingest"]
    assert key.hashed_secret == hashlib.sha256(secret.encode()).hexdigest()
    response = api.post("/api/v1/incidents", factories.incident_payload("cli"), key=secret)
    assert response.status_code == 202
    assert Incident.objects.get().project == project


def test_create_api_key_refuses_an_unknown_project(db):
    with pytest.raises(CommandError, match="No project"):
        _call("create_api_key", "missing", "k")
    assert not ApiKey.objects.exists()


# --- Memberships -------------------------------------------------------------------------------


def test_the_last_admin_can_be_neither_demoted_nor_removed(project):
    admin = factories.make_member(project, "admin")
    events = AuditEvent.objects.count()

    with pytest.raises(Conflict):
        services.membership_set(project=project, user=admin, role="viewer")
    with pytest.raises(Conflict):
        services.membership_remove(project=project, user=admin)

    assert Membership.objects.get(project=project, user=admin).role == "admin"
    assert AuditEvent.objects.count() == events


def test_an_admin_may_step_down_when_another_admin_remains(project):
    first = factories.make_member(project, "admin")
    factories.make_member(project, "admin")

    services.membership_set(project=project, user=first, role="reviewer")

    assert Membership.objects.get(project=project, user=first).role == "reviewer"
