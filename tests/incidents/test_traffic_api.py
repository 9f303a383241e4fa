"""Traffic counts (``POST /api/v1/traffic``) for agents that do not use the proxy: a project whose
agent reports only how many turns it served, and its failures, sees a skill's rate per 1,000
turns computed from those counts; a retried report counts once; bad bodies are refused naming
the field; reports are listed per project."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from base.models import Role
from incidents.models import IncidentGroup, TrafficReport
from skills.library.models import SkillRevision
from skills.versions.models import Release, ReleaseKind
from tests import factories

pytestmark = pytest.mark.django_db

TURNS_PER_DAY = 200
FAILURES_PER_DAY = 2  # without the skill: 10 incidents per 1,000 turns


@pytest.fixture
def thresholds(settings):
    settings.METACLAW = {
        **settings.METACLAW,
        "EFFECTIVENESS_WINDOW_DAYS": 7,
        "EFFECTIVENESS_MIN_TURNS": 100,
        "EFFECTIVENESS_MIN_INCIDENTS": 8,
    }


# The default window: the hour before the last one (a retry sends the same body).
HOUR = timezone.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)


def _report(api, key, **overrides):
    body = {
        "agent": "support-bot",
        "turns": 1200,
        "window_start": HOUR.isoformat(),
        "window_end": (HOUR + timedelta(hours=1)).isoformat(),
        **overrides,
    }
    return api.post("/api/v1/traffic", body, key=key)


def _day(api, key, day_start, *, failures: int, n: int) -> None:
    """One day of an agent without the proxy: a count of its turns, and its failures."""
    answer = _report(
        api,
        key,
        id=f"day-{n}",
        turns=TURNS_PER_DAY,
        window_start=day_start.isoformat(),
        window_end=(day_start + timedelta(days=1)).isoformat(),
    )
    assert answer.status_code == 201, answer.content
    items = [
        factories.incident_payload(
            f"inc-{n}-{i}", occurred_at=(day_start + timedelta(hours=3 + i)).isoformat()
        )
        for i in range(failures)
    ]
    if items:
        answer = api.post("/api/v1/incidents/batch", {"items": items}, key=key)
        assert answer.status_code == 207, answer.content


def test_a_skill_of_an_agent_without_the_proxy_is_measured_on_its_reported_counts(
    api, project, ingest_key, thresholds
):
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    live_at = now - timedelta(days=8)
    for day in range(7, 0, -1):
        _day(api, ingest_key, live_at - timedelta(days=day), failures=FAILURES_PER_DAY, n=day)
    group = IncidentGroup.objects.get(project=project)
    revision = SkillRevision.objects.filter(source_groups=group).first()
    if revision is None:  # the fast loop had not drafted one
        revision = factories.make_revision(project, source_groups=[group])
    admin_key = factories.make_key(project, ["admin"])
    answer = api.post(f"/api/v1/skills/revisions/{revision.pk}/approve", {}, key=admin_key)
    assert answer.status_code == 200, answer.content
    Release.objects.filter(project=project, kind=ReleaseKind.APPROVAL).update(created_at=live_at)
    for day in range(7):  # the skill fixes the failure: no more incidents
        _day(api, ingest_key, live_at + timedelta(days=day), failures=0, n=100 + day)

    answer = api.get(f"/api/v1/skills/revisions/{revision.pk}/effectiveness", key=admin_key)
    assert answer.status_code == 200, answer.content
    body = answer.json()
    target = body["target"]
    print(f"\nreported counts: {target}")
    assert (target["incidents_before"], target["turns_before"]) == (14, 7 * TURNS_PER_DAY)
    assert (target["incidents_after"], target["turns_after"]) == (0, 7 * TURNS_PER_DAY)
    assert target["rate_before"] == 10.0 and target["rate_after"] == 0.0
    assert body["verdict"] == "improved"
    # The daily series spreads each count over the UTC days its window covers.
    assert sum(point["turns"] for point in body["series"]) == 14 * TURNS_PER_DAY
    assert not project.trajectories.exists()  # no turn was recorded: only counts

    reviewer = factories.make_member(project, Role.REVIEWER)
    page = Client()
    page.force_login(reviewer)
    panel = page.get(
        f"/p/{project.slug}/review/{revision.pk}/effectiveness/", HTTP_HX_REQUEST="true"
    )
    assert panel.status_code == 200
    html = panel.content.decode()
    assert "Improved" in html and "14 in 1,400 turns" in html


def test_a_count_straddling_the_release_counts_on_each_side_in_proportion(
    api, project, ingest_key, thresholds
):
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    live_at = now - timedelta(days=2)
    group_payload = factories.incident_payload("straddle", occurred_at=live_at.isoformat())
    assert api.post("/api/v1/incidents", group_payload, key=ingest_key).status_code == 202
    group = IncidentGroup.objects.get(project=project)
    revision = factories.make_revision(project, source_groups=[group])
    admin_key = factories.make_key(project, ["admin"])
    assert api.post(
        f"/api/v1/skills/revisions/{revision.pk}/approve", {}, key=admin_key
    ).status_code == 200  # fmt: skip
    Release.objects.filter(project=project, kind=ReleaseKind.APPROVAL).update(created_at=live_at)
    answer = _report(
        api,
        ingest_key,
        turns=1000,
        window_start=(live_at - timedelta(hours=6)).isoformat(),
        window_end=(live_at + timedelta(hours=18)).isoformat(),
    )
    assert answer.status_code == 201, answer.content

    body = api.get(f"/api/v1/skills/revisions/{revision.pk}/effectiveness", key=admin_key).json()
    assert (body["target"]["turns_before"], body["target"]["turns_after"]) == (250, 750)


def test_a_retried_report_is_counted_once(api, project, ingest_key):
    first = _report(api, ingest_key, id="hour-09")
    again = _report(api, ingest_key, id="hour-09")

    assert first.status_code == 201, first.content
    assert first.json()["duplicate"] is False and first.json()["turns"] == 1200
    assert again.status_code == 200, again.content
    assert again.json()["duplicate"] is True and again.json()["id"] == first.json()["id"]
    assert TrafficReport.objects.filter(project=project).count() == 1
    listed = api.get("/api/v1/traffic", key=ingest_key).json()
    assert [item["client_id"] for item in listed["items"]] == ["hour-09"]
    assert sum(item["turns"] for item in listed["items"]) == 1200

    # The same id with other figures is not a retry: refused, nothing changes.
    other = _report(api, ingest_key, id="hour-09", turns=5)
    assert other.status_code == 409, other.content
    assert other.json()["errors"][0]["field"] == "id"
    assert TrafficReport.objects.get(project=project).turns == 1200


def test_reports_without_an_id_each_count(api, project, ingest_key):
    assert _report(api, ingest_key).status_code == 201
    assert _report(api, ingest_key).status_code == 201
    assert TrafficReport.objects.filter(project=project).count() == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"turns": -1}, "turns"),
        ({"turns": "12"}, "turns"),
        ({"turns": 1.5}, "turns"),
        ({"agent": ""}, "agent"),
        ({"agent": None}, "agent"),
        ({"window_start": "yesterday"}, "window_start"),
        ({"window_end": None}, "window_end"),
        (
            {"window_end": "2026-01-01T00:00:00Z", "window_start": "2026-01-02T00:00:00Z"},
            "window_end",
        ),  # fmt: skip
        (
            {"window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-01T00:00:00Z"},
            "window_end",
        ),  # fmt: skip
        (
            {"window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-03T00:00:00Z"},
            "window_end",
        ),  # fmt: skip
        ({"window_end": (timezone.now() + timedelta(hours=3)).isoformat()}, "window_end"),
        ({"policy_version": 0}, "policy_version"),
        ({"sessions": 3}, "sessions"),
    ],
)
def test_a_bad_report_is_refused_naming_the_field(api, project, ingest_key, change, field):
    answer = _report(api, ingest_key, **change)

    assert answer.status_code == 422, answer.content
    assert field in [error["field"] for error in answer.json()["errors"]], answer.json()
    assert not TrafficReport.objects.exists()


def test_an_agent_may_be_named_as_incidents_name_it(api, project, ingest_key):
    answer = _report(api, ingest_key, agent={"name": "support-bot", "version": "2"})
    assert answer.status_code == 201, answer.content
    assert answer.json()["agent"] == "support-bot"


def test_reports_are_listed_per_project_and_need_an_ingest_key(
    api, project, ingest_key, other_project
):
    other_key = factories.make_key(other_project, ["ingest"])
    _report(api, ingest_key, agent="support-bot")
    _report(api, ingest_key, agent="billing-bot", turns=7)
    _report(api, other_key, agent="theirs")

    mine = api.get("/api/v1/traffic", key=ingest_key).json()["items"]
    assert sorted(item["agent"] for item in mine) == ["billing-bot", "support-bot"]
    billing = api.get("/api/v1/traffic", key=ingest_key, agent="billing-bot").json()["items"]
    assert [item["turns"] for item in billing] == [7]
    runtime_only = factories.make_key(project, ["runtime"])
    assert _report(api, runtime_only).status_code == 403
    assert api.get("/api/v1/traffic", key=ingest_key, limit=0).status_code == 422
