from __future__ import annotations

import pytest

from incidents.models import GroupStatus, IncidentGroup
from tests import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def groups(api, project, ingest_key):
    items = [
        factories.incident_payload(f"p-{i}", error={"type": f"E{i % 4}", "message": "boom"})
        for i in range(12)
    ]
    api.post("/api/v1/incidents/batch", {"items": items}, key=ingest_key)
    return list(IncidentGroup.objects.all())


def test_login_is_required(client, project):
    response = client.get(f"/p/{project.slug}/groups/")
    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_member_sees_the_groups_with_counts(client, project, groups):
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(f"/p/{project.slug}/groups/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "E0: boom" in html and "E3: boom" in html
    assert html.count('class="spark"') == 4


def test_group_list_query_count_does_not_grow_with_data(
    client, project, groups, api, ingest_key, django_assert_num_queries
):
    client.force_login(factories.make_member(project, "viewer"))
    client.get(f"/p/{project.slug}/groups/")  # warm the session
    # session, user, project, membership, count, page, sparklines, agents, switcher
    with django_assert_num_queries(9):
        client.get(f"/p/{project.slug}/groups/")
    more = [
        factories.incident_payload(f"q-{i}", error={"type": f"X{i}", "message": "m"})
        for i in range(30)
    ]
    api.post("/api/v1/incidents/batch", {"items": more}, key=ingest_key)
    with django_assert_num_queries(9):
        client.get(f"/p/{project.slug}/groups/")


def test_htmx_filter_returns_only_the_table_partial(client, project, groups):
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get(f"/p/{project.slug}/groups/?kind=timeout", HTTP_HX_REQUEST="true")
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="group-table">')
    assert "<html" not in html
    assert "No incident groups match" in html


def test_a_non_member_gets_404_for_another_projects_pages(client, project, other_project, groups):
    client.force_login(factories.make_member(other_project, "admin"))
    assert client.get(f"/p/{project.slug}/groups/").status_code == 404
    assert client.get(f"/p/{project.slug}/groups/{groups[0].id}/").status_code == 404


def test_a_viewer_cannot_resolve_but_a_reviewer_can(client, project, groups):
    group = groups[0]
    url = f"/p/{project.slug}/groups/{group.id}/status/"
    client.force_login(factories.make_member(project, "viewer"))
    assert client.post(url, {"status": "resolved"}).status_code == 403
    group.refresh_from_db()
    assert group.status == GroupStatus.UNRESOLVED

    client.force_login(factories.make_member(project, "reviewer"))
    response = client.post(url, {"status": "resolved"}, follow=True)
    assert response.status_code == 200
    group.refresh_from_db()
    assert group.status == GroupStatus.RESOLVED
    assert "Group updated." in response.content.decode()


def test_a_member_asking_for_another_projects_group_gets_404(client, project, other_project, api):
    other_key = factories.make_key(other_project, scopes=["ingest"])
    api.post("/api/v1/incidents", factories.incident_payload("x"), key=other_key)
    foreign = IncidentGroup.objects.get(project=other_project)
    client.force_login(factories.make_member(project, "reviewer"))

    assert client.get(f"/p/{project.slug}/groups/{foreign.id}/").status_code == 404
    assert client.get(f"/p/{project.slug}/groups/999999/").status_code == 404
    response = client.post(f"/p/{project.slug}/groups/{foreign.id}/status/", {"status": "resolved"})
    assert response.status_code == 404
    foreign.refresh_from_db()
    assert foreign.status == GroupStatus.UNRESOLVED


def test_a_nul_character_in_a_filter_is_a_400_not_a_500(client, api, project, ingest_key):
    client.force_login(factories.make_member(project, "viewer"))
    assert client.get(f"/p/{project.slug}/groups/?agent=a%00b").status_code == 400
    response = api.get("/api/v1/incidents", key=ingest_key, agent="a\x00b")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "agent"
