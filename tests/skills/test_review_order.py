"""Issue 17, item 6: the review queue weighs severity with impact by default (a critical leak of
card numbers above a low-severity chart fix with more incidents), says which order it shows,
offers the others, and refuses an order it does not know, on the page and in the API."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from base.models import Role
from incidents.models import Incident
from skills.library.models import SkillRevision
from tests import factories
from tests.embedded import run_embedded

pytestmark = pytest.mark.django_db


def ingest(api, key, **overrides) -> Incident:
    response = api.post("/api/v1/incidents", factories.incident_payload(**overrides), key=key)
    assert response.status_code == 202, response.content
    return Incident.objects.get(pk=response.json()["id"])


def ingest_series(
    api, key, count: int, *, severity: str, error: dict, session: str, apart: timedelta
) -> list[Incident]:
    """``count`` tool errors from sessions ``<session>-<n>``, the last ``apart`` ago and each
    earlier one ``apart`` before it."""
    now = timezone.now()
    return [
        ingest(
            api,
            key,
            kind="tool_error",
            severity=severity,
            error=error,
            session_id=f"{session}-{i}",
            occurred_at=(now - apart * (1 + i)).isoformat(),
        )
        for i in range(count)
    ]


def propose(project, slug: str, name: str, incidents=()) -> SkillRevision:
    return factories.make_revision(
        project,
        slug,
        name=name,
        description="When it applies.",
        instructions="Do it right.",
        source_incidents=list(incidents),
        source_groups=list({i.group for i in incidents}),
    )


@pytest.fixture
def proposals(api, ingest_key, project) -> dict[str, SkillRevision]:
    """Proposed in this order: a critical leak of card numbers (3 incidents, the last an hour
    ago), a low-severity chart fix (10 incidents, the last a minute ago), and a skill a person
    wrote (no evidence)."""
    leak = ingest_series(
        api,
        ingest_key,
        3,
        severity="critical",
        error={"type": "CardNumberLeak", "message": "reply echoed the full card number"},
        session="s-leak",
        apart=timedelta(hours=1),
    )
    chart = ingest_series(
        api,
        ingest_key,
        10,
        severity="low",
        error={"type": "ChartAxisError", "message": "chart y axis label cut off"},
        session="s-chart",
        apart=timedelta(minutes=1),
    )
    assert {i.group_id for i in leak} != {i.group_id for i in chart}
    return {
        "leak": propose(project, "mask-card-numbers", "Mask card numbers", leak),
        "chart": propose(project, "chart-labels", "Fit chart labels", chart),
        "human": propose(project, "greet", "Greet politely"),
    }


@pytest.fixture
def reviewer_client(client, project):
    client.force_login(factories.make_member(project, Role.REVIEWER))
    return client


def queue_url(project) -> str:
    return reverse("skills:review_queue", kwargs={"project_slug": project.slug})


def listed_on_page(html: str) -> list[int]:
    return [int(pk) for pk in re.findall(r'class="queue-item[^"]*" data-id="(\d+)"', html)]


def test_a_critical_card_number_leak_is_listed_above_a_low_severity_chart_fix_by_default(
    proposals, project, reviewer_client, api, admin_key
):
    response = reviewer_client.get(queue_url(project))

    assert response.status_code == 200
    html = response.content.decode()
    leak, chart, human = (proposals[k].pk for k in ("leak", "chart", "human"))
    assert listed_on_page(html) == [leak, chart, human]
    # The page says which order it shows, and how priority is computed.
    assert "Ordered by <strong>priority: severity × impact</strong>" in html
    assert "ln(1 + incidents)" in html
    assert 'data-order="incidents"' in html and "most incidents" in html
    assert 'data-order="newest"' in html and "newest proposal" in html
    queue = response.context["queue"]
    assert (queue[0].impact_events, queue[1].impact_events) == (3, 10)
    assert queue[0].priority > queue[1].priority > queue[2].priority == 0

    listed = api.get("/api/v1/skills/review-queue", key=admin_key)

    assert listed.status_code == 200
    body = listed.json()
    assert body["order"] == "priority"
    assert "severity weight" in body["order_explained"]
    assert [item["id"] for item in body["items"]] == [leak, chart, human]
    assert [item["worst_severity"] for item in body["items"]] == ["critical", "low", None]
    assert [item["impact_events"] for item in body["items"]] == [3, 10, 0]


@pytest.mark.parametrize(
    ("order", "label", "expected"),
    [
        ("priority", "priority: severity × impact", ["leak", "chart", "human"]),
        ("incidents", "most incidents", ["chart", "leak", "human"]),
        ("newest", "newest proposal", ["human", "chart", "leak"]),
        ("recent", "latest incident", ["chart", "leak", "human"]),
        ("severity", "worst severity", ["leak", "chart", "human"]),
        ("oldest", "oldest proposal", ["leak", "chart", "human"]),
    ],
)
def test_each_order_lists_the_queue_as_it_says_on_the_page_and_in_the_api(
    proposals, project, reviewer_client, api, admin_key, order, label, expected
):
    ids = [proposals[name].pk for name in expected]

    page = reviewer_client.get(queue_url(project), {"order": order})
    partial = reviewer_client.get(
        queue_url(project), {"order": order}, HTTP_HX_REQUEST="true", HTTP_HX_TARGET="queue"
    )
    listed = api.get(f"/api/v1/skills/review-queue?order={order}", key=admin_key)

    assert page.status_code == partial.status_code == listed.status_code == 200
    html = page.content.decode()
    assert listed_on_page(html) == ids
    assert f"Ordered by <strong>{label}</strong>" in html
    assert f'<option value="{order}" selected>' in html
    assert listed_on_page(partial.content.decode()) == ids
    assert f"Ordered by <strong>{label}</strong>" in partial.content.decode()
    assert [item["id"] for item in listed.json()["items"]] == ids
    assert listed.json()["order"] == order


def test_the_other_orders_keep_the_filters(proposals, project, reviewer_client):
    html = reviewer_client.get(queue_url(project), {"q": "card"}).content.decode()

    assert listed_on_page(html) == [proposals["leak"].pk]
    assert re.search(r'href="[^"]*\?q=card&amp;order=newest"', html)


def test_an_unknown_order_is_refused_naming_the_field(proposals, project, reviewer_client, api,
                                                      admin_key):  # fmt: skip
    page = reviewer_client.get(queue_url(project), {"order": "loudest"})

    assert page.status_code == 400
    html = page.content.decode()
    assert 'id="order-error"' in html and 'data-field="order"' in html
    assert "Unknown order &#x27;loudest&#x27;: one of priority, incidents" in html
    assert 'aria-invalid="true"' in html
    # The queue is still there, in the default order.
    assert listed_on_page(html) == [proposals[k].pk for k in ("leak", "chart", "human")]

    listed = api.get("/api/v1/skills/review-queue?order=loudest", key=admin_key)

    assert listed.status_code == 422
    body = listed.json()
    assert body["code"] == "invalid"
    assert [error["field"] for error in body["errors"]] == ["order"]


def test_the_api_queue_needs_an_admin_key_and_stays_in_its_project(
    proposals, project, other_project, api, ingest_key
):
    refused = api.get("/api/v1/skills/review-queue", key=ingest_key)
    theirs = api.get(
        "/api/v1/skills/review-queue", key=factories.make_key(other_project, ["admin"])
    )

    assert refused.status_code == 403
    assert theirs.status_code == 200
    assert theirs.json()["items"] == []


EMBEDDED_SCRIPT = r"""
import json
from datetime import timedelta

import django

django.setup()

from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from base import services
from incidents.models import Incident
from metaclaw_site.projects import project_create
from skills.library import services as library_services
from skills.library.models import Origin
from tests import factories
from tests.embedded import run_embedded

call_command("migrate", verbosity=0)
project = project_create(name="Embedded")
key = services.api_key_create(project=project, name="k", scopes=["ingest", "admin"]).secret
client = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
now = timezone.now()


def ingest(n, severity, kind):
    items = [
        factories.incident_payload(
            severity=severity, error={"type": kind, "message": kind},
            occurred_at=(now - timedelta(days=i)).isoformat(),
        )
        for i in range(n)
    ]
    response = client.post("/api/v1/incidents/batch", json.dumps({"items": items}),
                           content_type="application/json")
    assert response.status_code == 207, response.content
    return list(Incident.objects.filter(error_type=kind))


ids = {}
for name, (n, severity) in {"leak": (3, "critical"), "chart": (10, "low")}.items():
    incidents = ingest(n, severity, name)
    ids[name] = library_services.skill_revision_propose(
        project=project,
        draft=library_services.RevisionDraft(
            slug=name, name=name, description="d", instructions="i",
            origin=Origin.DEMO_FIXTURE, source_incidents=incidents,
            source_groups=list({i.group for i in incidents}),
        ),
    ).pk
listed = client.get("/api/v1/skills/review-queue").json()["items"]
print(json.dumps({
    "vendor": connection.vendor,
    "ids": ids,
    "listed": [item["id"] for item in listed],
    "priority": [item["priority"] for item in listed],
}))
"""


def test_the_priority_order_works_in_the_embedded_mode_on_sqlite(tmp_path):
    out = run_embedded(EMBEDDED_SCRIPT, tmp_path)

    assert out["vendor"] == "sqlite"
    assert out["listed"] == [out["ids"]["leak"], out["ids"]["chart"]]
    assert out["priority"][0] > out["priority"][1] > 0
