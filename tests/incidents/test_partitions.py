"""The incidents table partitioned by month (``manage.py partition_incidents``), on the suite's
PostgreSQL: every row and link kept, ingestion, idempotency across partitions, pages and deletes
working on it, and the months ahead made (rows that arrived beyond them moved into theirs).

Each test converts the table inside its own transaction, which PostgreSQL rolls back with the
DDL at the end: the tests after it find the table as the migrations left it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.utils import timezone

from incidents import partitions
from incidents.models import Incident, IncidentGroup
from skills.library.models import SkillRevision
from skills.versions.models import Release
from tests import factories

pytestmark = pytest.mark.django_db


def where_each_is() -> dict[str, str]:
    """client id -> the partition (or table) that holds its row."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT client_id, tableoid::regclass::text FROM incidents_incident")
        return dict(cursor.fetchall())


def month(ahead: int = 0) -> str:
    now = timezone.now().astimezone(UTC)
    index = now.year * 12 + now.month - 1 + ahead
    return f"{index // 12}_{index % 12 + 1:02d}"


def received(client_id: str, when: datetime) -> None:
    """Backdate (or postdate) an incident's arrival, as if it had come then."""
    Incident.objects.filter(client_id=client_id).update(received_at=when)


def partition(out: StringIO | None = None, *args: str) -> str:
    out = out or StringIO()
    call_command("partition_incidents", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def stored(api, project, ingest_key):
    """Incidents stored before the conversion: two this month, one 70 days ago, all in one
    group, the old one a source of a proposed skill revision."""
    for client_id in ["now-1", "now-2", "old-1"]:
        assert api.post("/api/v1/incidents", factories.incident_payload(client_id), key=ingest_key).status_code == 202  # fmt: skip
    received("old-1", timezone.now() - timedelta(days=70))
    revision = factories.make_revision(project)
    revision.source_incidents.set(Incident.objects.filter(client_id__in=["old-1", "now-1"]))
    return revision


def foreign_keys() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'incidents_incident'::regclass "
            "AND contype = 'f'"
        )
        return {name for (name,) in cursor.fetchall()}


def test_converting_keeps_every_row_and_link_and_puts_each_in_its_month(stored):
    keys = foreign_keys()
    before = {
        row["client_id"]: row
        for row in Incident.objects.values("client_id", "id", "group_id", "received_at", "messages")
    }

    said = partition()

    assert partitions.is_partitioned()
    assert f"its 3 rows kept where they are, in incidents_incident_before_{month(1)}" in said
    after = {
        row["client_id"]: row
        for row in Incident.objects.values("client_id", "id", "group_id", "received_at", "messages")
    }
    assert after == before
    # The table as it was holds every row until next month; each month after has its own.
    assert set(where_each_is().values()) == {f"incidents_incident_before_{month(1)}"}
    names = set(partitions.partitions())
    assert names == {
        f"incidents_incident_before_{month(1)}",
        "incidents_incident_default",
        *(f"incidents_incident_{month(ahead)}" for ahead in range(1, 4)),
    }
    assert sorted(SkillRevision.objects.get(pk=stored.pk).source_incidents.values_list("client_id", flat=True)) == ["now-1", "old-1"]  # fmt: skip
    # The model's indexes and keys are on the partitioned table under their own names.
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'incidents_incident'")
        indexes = {name for (name,) in cursor.fetchall()}
    assert {"incidents_incident_pkey", "incident_recent", "incident_group_recent"} <= indexes
    assert foreign_keys() == keys and len(keys) >= 2  # its project, its group


def test_on_the_partitioned_table_ingest_is_idempotent_across_months(stored, api, ingest_key):
    partition()
    group = IncidentGroup.objects.get()

    fresh = api.post("/api/v1/incidents", factories.incident_payload("new-1"), key=ingest_key)
    again = api.post("/api/v1/incidents", factories.incident_payload("new-1"), key=ingest_key)
    old_again = api.post("/api/v1/incidents", factories.incident_payload("old-1"), key=ingest_key)
    batch = api.post(
        "/api/v1/incidents/batch",
        {"items": [factories.incident_payload(cid) for cid in ["b-1", "now-2", "b-1"]]},
        key=ingest_key,
    )

    assert (fresh.status_code, again.status_code, old_again.status_code) == (202, 200, 200)
    assert again.json()["id"] == fresh.json()["id"] and again.json()["duplicate"]
    assert old_again.json()["id"] == str(Incident.objects.get(client_id="old-1").pk)
    assert [item["status"] for item in batch.json()["results"]] == [202, 200, 200]
    assert sorted(Incident.objects.values_list("client_id", flat=True)) == [
        "b-1", "new-1", "now-1", "now-2", "old-1"
    ]  # fmt: skip
    assert where_each_is()["new-1"] == f"incidents_incident_before_{month(1)}"
    received("b-1", timezone.now() + timedelta(days=35))  # moves into its month's partition
    assert where_each_is()["b-1"] == f"incidents_incident_{month(1)}"
    again_next_month = api.post(
        "/api/v1/incidents", factories.incident_payload("b-1"), key=ingest_key
    )
    assert again_next_month.status_code == 200
    group.refresh_from_db()
    assert group.event_count == 5


def test_pages_and_deletes_work_on_the_partitioned_table(stored, client, project):
    partition()
    group = IncidentGroup.objects.get()
    client.force_login(factories.make_member(project, "viewer"))

    listing = client.get(f"/p/{project.slug}/groups/")
    detail = client.get(f"/p/{project.slug}/groups/{group.pk}/")

    assert listing.status_code == detail.status_code == 200
    assert "ToolArgumentError" in listing.content.decode()
    assert "ToolArgumentError" in detail.content.decode()
    # Django cascades what the dropped foreign keys no longer do.
    Incident.objects.filter(client_id="old-1").delete()
    assert list(stored.source_incidents.values_list("client_id", flat=True)) == ["now-1"]
    Release.objects.filter(project=project).delete()  # releases protect their versions
    project.delete()
    assert not Incident.objects.exists()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM skills_skillrevision_source_incidents")
        assert cursor.fetchone()[0] == 0


def test_rows_that_arrive_beyond_the_months_made_move_into_their_month_when_it_is_made(stored):
    partition(None, "--months-ahead", "1")
    received("now-2", timezone.now() + timedelta(days=100))  # past the last month made
    assert where_each_is()["now-2"] == "incidents_incident_default"

    said = partition(None, "--months-ahead", "5")

    assert "partitioned already" in said
    beyond = Incident.objects.get(client_id="now-2").received_at.astimezone(UTC)
    assert where_each_is()["now-2"] == f"incidents_incident_{beyond:%Y_%m}"
    assert f"incidents_incident_{beyond:%Y_%m}" in said
    # Made once: the task the beat runs finds nothing more to do.
    assert partitions.incident_partitions_ensure(months_ahead=5) == {"made": []}


def test_the_daily_task_does_nothing_to_a_table_that_is_not_partitioned(stored):
    from incidents.tasks import ensure_incident_partitions

    ensure_incident_partitions()

    assert not partitions.is_partitioned()
    assert set(where_each_is().values()) == {"incidents_incident"}


def test_a_negative_months_ahead_is_refused():
    with pytest.raises(CommandError, match="--months-ahead"):
        partition(None, "--months-ahead", "-1")
