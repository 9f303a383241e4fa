"""Query counts that must not grow with the data: the regression checks an ingest runs while
it holds its groups' row locks, and the group page's skill proposals."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from incidents.models import GroupStatus, Incident, IncidentGroup, SynthesisStatus
from skills.library.models import SkillRevision
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.services import skill_revision_approve
from tests import factories

pytestmark = pytest.mark.django_db

BATCH = "/api/v1/incidents/batch"


def _payload(client_id: str, group: int, **extra) -> dict:
    return factories.incident_payload(
        client_id, error={"type": f"ToolError{group}", "message": f"tool {group} broke"}, **extra
    )


def _groups_with_live_skills(api, project, ingest_key, count: int) -> list[IncidentGroup]:
    """``count`` groups, each the source of a skill that is in the active policy."""
    api.post(BATCH, {"items": [_payload(f"first-{i}", i) for i in range(count)]}, key=ingest_key)
    groups = list(IncidentGroup.objects.filter(project=project).order_by("id"))
    assert len(groups) == count
    for i, group in enumerate(groups):
        revision = factories.make_revision(project, f"skill-{i}", source_groups=[group])
        skill_revision_approve(revision=revision, actor=None, actor_label="test")
    # The fast loop has answered for each: a proposal, now live.
    IncidentGroup.objects.filter(pk__in=[g.pk for g in groups]).update(
        synthesis_status=SynthesisStatus.PROPOSED
    )
    return groups


def _warm_the_key(api, key: str, stored_id: str) -> None:
    """Authenticate once just before the counted request (sending a stored incident again,
    which stores nothing): a key's lookup is cached for a while and its use stamped at most
    once a minute, which a slow setup would otherwise count."""
    response = api.post(BATCH, {"items": [_payload(stored_id, 0)]}, key=key)
    assert response.json()["duplicates"] == 1


def _ingest_queries(api, project, ingest_key, count: int) -> int:
    groups = _groups_with_live_skills(api, project, ingest_key, count)
    active = PolicyVersion.objects.get(project=project, status=VersionStatus.ACTIVE)
    items = [
        _payload(f"again-{project.pk}-{i}", i, policy_version=active.number) for i in range(count)
    ]
    _warm_the_key(api, ingest_key, "first-0")
    with CaptureQueriesContext(connection) as queries:
        response = api.post(BATCH, {"items": items}, key=ingest_key)
    assert response.status_code == 207, response.content
    assert response.json()["accepted"] == count
    # Every group regressed and asked for a revision of its skill: the checks really ran.
    after = IncidentGroup.objects.filter(pk__in=[g.pk for g in groups])
    assert {g.status for g in after} == {GroupStatus.REGRESSED}
    assert {g.synthesis_status for g in after} == {SynthesisStatus.WAITING}
    assert Incident.objects.filter(project=project).count() == 2 * count
    return len(queries)


def test_an_ingest_that_regresses_twenty_groups_runs_as_many_queries_as_one_with_one(
    api, project, other_project, ingest_key
):
    one = _ingest_queries(api, project, ingest_key, 1)
    twenty = _ingest_queries(api, other_project, factories.make_key(other_project), 20)

    assert twenty == one, f"1 group: {one} queries, 20 groups: {twenty}"


def test_an_ingest_into_resolved_groups_audits_them_in_constant_queries(
    api, project, other_project, ingest_key
):
    def resolved_then_again(project, key, count: int) -> int:
        api.post(BATCH, {"items": [_payload(f"r-{i}", i) for i in range(count)]}, key=key)
        IncidentGroup.objects.filter(project=project).update(status=GroupStatus.RESOLVED)
        items = [_payload(f"r2-{i}", i) for i in range(count)]
        _warm_the_key(api, key, "r-0")
        with CaptureQueriesContext(connection) as queries:
            api.post(BATCH, {"items": items}, key=key)
        statuses = set(IncidentGroup.objects.filter(project=project).values_list("status"))
        assert statuses == {(GroupStatus.REGRESSED,)}
        return len(queries)

    one = resolved_then_again(project, ingest_key, 1)
    twenty = resolved_then_again(other_project, factories.make_key(other_project), 20)

    assert twenty == one, f"1 group: {one} queries, 20 groups: {twenty}"


def test_the_group_page_shows_every_proposal_in_constant_queries(client, api, project, ingest_key):
    api.post(BATCH, {"items": [_payload("g-1", 1)]}, key=ingest_key)
    group = IncidentGroup.objects.get(project=project)
    client.force_login(factories.make_member(project, "viewer"))
    url = f"/p/{project.slug}/groups/{group.pk}/"
    client.get(url)  # warm the session

    def page_queries(revisions: int) -> tuple[int, str]:
        while SkillRevision.objects.filter(source_groups=group).count() < revisions:
            n = SkillRevision.objects.count()
            factories.make_revision(project, f"proposal-{n}", source_groups=[group])
        with CaptureQueriesContext(connection) as queries:
            response = client.get(url)
        assert response.status_code == 200
        return len(queries), response.content.decode()

    one, _ = page_queries(1)
    ten, html = page_queries(10)

    assert all(f"proposal-{n}" in html for n in range(10))
    assert ten == one, f"1 revision: {one} queries, 10 revisions: {ten}"
