"""Single incidents that arrive together on the fast lane share a transaction (group commit,
``base.coalescing``), and each request is still answered as if it had come alone.

To make "together" certain rather than likely, a second PostgreSQL session holds the lock of
the group row, so the first request's transaction waits inside the database while the others
arrive; then it lets go."""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from incidents import signals
from incidents.models import Incident, IncidentGroup
from tests import factories
from tests.incidents.test_fast_lane import afast, fast

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def transactions():
    """The ingest transactions that stored incidents: the client ids each one stored."""
    stored: list[list[str]] = []

    def record(sender, incident_ids, **kwargs):
        stored.append(
            sorted(Incident.objects.filter(pk__in=incident_ids).values_list("client_id", flat=True))
        )

    signals.incidents_ingested.connect(record, weak=False)
    yield stored
    signals.incidents_ingested.disconnect(record)


@contextmanager
def group_row_locked(group_id: int):
    """Another session holds the group row's lock until the block ends."""
    settings = connection.settings_dict
    with psycopg.connect(
        dbname=settings["NAME"],
        user=settings["USER"],
        host=settings["HOST"],
        port=settings["PORT"] or 5432,
        password=settings["PASSWORD"] or None,
    ) as other:
        other.execute("SELECT id FROM incidents_incidentgroup WHERE id = %s FOR UPDATE", [group_id])
        yield
        other.commit()


def post_while_locked(key: str, group_id: int, first: dict, then: list[dict]):
    """``first`` is sent and waits on the group's lock; ``then`` arrive meanwhile; the lock goes.
    Every request's (status, body), in the order given."""

    async def run():
        with group_row_locked(group_id):
            leader = asyncio.ensure_future(afast("/api/v1/incidents", first, key=key))
            await asyncio.sleep(0.5)  # its transaction is now waiting for the lock
            assert not leader.done()
            others = [asyncio.ensure_future(afast("/api/v1/incidents", p, key=key)) for p in then]
            await asyncio.sleep(0.5)  # they are all waiting for the next transaction
            assert not any(task.done() for task in others)
        answers = await asyncio.gather(leader, *others)
        return [(status, json.loads(body)) for status, _, body, _ in answers]

    return async_to_sync(run)()


def warm(key: str) -> int:
    """One incident stored the usual way (its key is now cached); its group's id."""
    status, _, body, _ = fast("/api/v1/incidents", factories.incident_payload("warm"), key=key)
    assert status == 202
    return json.loads(body)["group_id"]


def test_incidents_that_arrive_together_share_one_transaction_and_get_their_own_answers(
    project, ingest_key, transactions
):
    group_id = warm(ingest_key)
    other_kind = {"type": "QueryTimeout", "message": "orders query exceeded 30000 ms"}
    then = [
        factories.incident_payload(f"c-{n}", **({"error": other_kind} if n % 2 else {}))
        for n in range(8)
    ]

    answers = post_while_locked(ingest_key, group_id, factories.incident_payload("a"), then)

    assert [status for status, _ in answers] == [202] * 9
    assert [body["client_id"] for _, body in answers] == ["a"] + [f"c-{n}" for n in range(8)]
    assert len({body["id"] for _, body in answers}) == 9
    # The first alone (it was under way), the eight that arrived meanwhile in one transaction.
    assert transactions == [["warm"], ["a"], sorted(f"c-{n}" for n in range(8))]
    stored = dict(Incident.objects.values_list("client_id", "group_id"))
    assert {body["client_id"]: body["group_id"] for _, body in answers} == {
        cid: gid for cid, gid in stored.items() if cid != "warm"
    }
    timeouts = IncidentGroup.objects.exclude(pk=group_id).get()
    assert IncidentGroup.objects.get(pk=group_id).event_count == 1 + 1 + 4
    assert timeouts.event_count == 4
    assert {stored[f"c-{n}"] for n in range(1, 8, 2)} == {timeouts.pk}


def test_a_client_id_sent_several_times_at_once_is_stored_once(project, ingest_key, transactions):
    group_id = warm(ingest_key)
    same = factories.incident_payload("same")

    answers = post_while_locked(ingest_key, group_id, same, [same, same, same])

    assert [status for status, _ in answers] == [202, 200, 200, 200]
    assert len({body["id"] for _, body in answers}) == 1
    assert [body["duplicate"] for _, body in answers] == [False, True, True, True]
    assert Incident.objects.filter(client_id="same").count() == 1
    assert IncidentGroup.objects.get(pk=group_id).event_count == 2
    assert transactions == [["warm"], ["same"]]  # the repeats stored nothing


def test_an_incident_the_database_refuses_fails_only_its_own_request(
    project, ingest_key, transactions
):
    group_id = warm(ingest_key)
    # A real refusal by PostgreSQL, for one client id only.
    with connection.cursor() as cursor:
        cursor.execute(
            """
            CREATE FUNCTION refuse_poison() RETURNS trigger AS $$
            BEGIN
                IF NEW.client_id = 'poison' THEN RAISE EXCEPTION 'refused'; END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON incidents_incident
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
    then = [factories.incident_payload(cid) for cid in ["b-1", "poison", "b-2", "b-3"]]

    answers = post_while_locked(ingest_key, group_id, factories.incident_payload("a"), then)

    assert [status for status, _ in answers] == [202, 202, 500, 202, 202]
    assert answers[2][1]["code"] == "internal_error"
    assert set(Incident.objects.values_list("client_id", flat=True)) == {
        "warm", "a", "b-1", "b-2", "b-3"
    }  # fmt: skip
    assert IncidentGroup.objects.get(pk=group_id).event_count == 5
    # The shared transaction was rolled back whole; then each was stored alone.
    assert transactions[:2] == [["warm"], ["a"]]
    assert sorted(transactions[2:]) == [["b-1"], ["b-2"], ["b-3"]]


def test_with_group_commit_off_each_incident_has_a_transaction_of_its_own(
    project, ingest_key, transactions, settings
):
    settings.METACLAW = {**settings.METACLAW, "INGEST_GROUP_COMMIT_MAX_ITEMS": 1}
    group_id = warm(ingest_key)
    then = [factories.incident_payload(f"c-{n}") for n in range(3)]

    answers = post_while_locked(ingest_key, group_id, factories.incident_payload("a"), then)

    assert [status for status, _ in answers] == [202] * 4
    # Each waited for the lock in a transaction of its own.
    assert transactions[:2] == [["warm"], ["a"]]
    assert sorted(transactions[2:]) == [["c-0"], ["c-1"], ["c-2"]]
