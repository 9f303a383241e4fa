"""The incidents table partitioned by time in PostgreSQL, for when it holds hundreds of millions
of rows (``docs/deploy.md``): ``incidents_partition`` converts it once (``manage.py
partition_incidents``), ``incident_partitions_ensure`` keeps a partition per month ready ahead
of time (the beat runs it daily; it does nothing on a table that is not partitioned).

The shape: ranges of ``received_at`` (UTC months); the table as it was becomes the partition of
everything before the month after the conversion (no row is copied), each later month gets its
own, and a DEFAULT partition takes whatever arrives outside the months made
(``incident_partitions_ensure`` moves such rows into their month when it makes it). PostgreSQL
requires a partitioned table's unique keys to include the partition key, so:

- the primary key is ``(id, received_at)`` (ids are random UUIDs: still unique);
- ``(project_id, client_id)`` is unique in each partition, which the ingest's ``ON CONFLICT DO
  NOTHING`` uses, and the ingest reads the client ids already stored across all partitions
  before it inserts; only two requests with one client id at the same instant on either side of
  a month's boundary could both store it;
- foreign keys that point at incidents (a revision's source incidents, a replay's incident) are
  dropped: Django cascades deletes itself, and their columns and indexes stay.

Only ``incidents.ingest`` and these functions write the incidents table."""

from __future__ import annotations

from datetime import UTC, datetime

from django.db import connection, transaction
from django.utils import timezone

from incidents.models import Incident

TABLE = Incident._meta.db_table
DEFAULT_PARTITION = f"{TABLE}_default"


class PartitioningUnavailable(Exception):
    """The database cannot partition (SQLite, the embedded mode)."""


def is_partitioned() -> bool:
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = %s::regclass)",
            [TABLE],
        )
        return cursor.fetchone()[0]


def _month(when: datetime, ahead: int = 0) -> datetime:
    """The start (UTC) of the month ``ahead`` months after the one ``when`` falls in."""
    when = when.astimezone(UTC)
    index = when.year * 12 + when.month - 1 + ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition_name(month: datetime) -> str:
    return f"{TABLE}_{month:%Y_%m}"


def partitions() -> list[str]:
    """The names of the table's partitions, sorted."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass ORDER BY c.relname",
            [TABLE],
        )
        return [name for (name,) in cursor.fetchall()]


def incidents_partition(*, months_ahead: int = 3, now: datetime | None = None) -> dict:
    """Convert the incidents table into one partitioned by month of ``received_at``, keeping
    every row, index and key, in one transaction. No row is copied: the table as it is becomes
    the partition of everything before next month (PostgreSQL checks its rows and adds the
    ``(id, received_at)`` key's index: seconds per million rows, the table locked meanwhile),
    and the months after it get partitions of their own. On a table partitioned already it only
    makes the months ahead. ``{"converted": bool, "rows": n kept, "made": [partition, ...]}``."""
    if connection.vendor != "postgresql":
        raise PartitioningUnavailable("Partitioning the incidents table needs PostgreSQL.")
    now = now or timezone.now()
    with transaction.atomic(), connection.cursor() as cursor:
        if is_partitioned():
            return {"converted": False, "rows": 0, **incident_partitions_ensure(
                months_ahead=months_ahead, now=now)}  # fmt: skip
        # Deferred foreign-key checks of this transaction's rows must run before ALTER TABLE.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = %s::regclass AND contype = 'f' ORDER BY conname",
            [TABLE],
        )
        own_keys = cursor.fetchall()
        cursor.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint "
            "WHERE confrelid = %s::regclass AND contype = 'f' ORDER BY 1, 2",
            [TABLE],
        )
        for table, name in cursor.fetchall():
            cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        # Its indexes as defined now (by name, on this table's name): the partitioned table
        # gets the same ones, and attaching this table adopts its indexes as their partitions.
        cursor.execute(
            "SELECT i.relname, pg_get_indexdef(x.indexrelid), x.indisunique FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = %s::regclass "
            "ORDER BY i.relname",
            [TABLE],
        )
        indexes = cursor.fetchall()
        bound = _month(now, 1)
        before = f"{TABLE}_before_{bound:%Y_%m}"
        cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {before}")
        for name, _, _ in indexes:
            cursor.execute(f'ALTER INDEX "{name}" RENAME TO "{name[:40]}_before"')
        # Its key on ``id`` alone gives way to the partitioned table's ``(id, received_at)``.
        cursor.execute(f'ALTER TABLE {before} DROP CONSTRAINT "{TABLE}_pkey_before"')
        cursor.execute(
            f"CREATE TABLE {TABLE} (LIKE {before} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
            "PARTITION BY RANGE (received_at)"
        )
        cursor.execute(
            f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id, received_at)"
        )
        for _, definition, unique in indexes:
            if not unique:
                cursor.execute(definition)
        for name, definition in own_keys:
            cursor.execute(f'ALTER TABLE {TABLE} ADD CONSTRAINT "{name}" {definition}')
        cursor.execute(
            f"ALTER TABLE {TABLE} ATTACH PARTITION {before} "
            f"FOR VALUES FROM (MINVALUE) TO ('{bound.isoformat()}')"
        )
        cursor.execute(f"SELECT count(*) FROM {before}")
        rows = cursor.fetchone()[0]
        made = [before, _make_partition(cursor, DEFAULT_PARTITION, None, None)]
        made += incident_partitions_ensure(months_ahead=months_ahead, now=now)["made"]
    return {"converted": True, "rows": rows, "made": made}


def incident_partitions_ensure(*, months_ahead: int = 3, now: datetime | None = None) -> dict:
    """The partitions of this month and the ``months_ahead`` next ones, made where missing
    (rows that went to the DEFAULT partition in the meantime move into theirs); months that the
    converted table's own partition covers are not made. Idempotent; nothing to do on a table
    that is not partitioned. ``{"made": [partition, ...]}``."""
    if not is_partitioned():
        return {"made": []}
    now = now or timezone.now()
    have = set(partitions())
    covered = max(
        (name.removeprefix(f"{TABLE}_before_") for name in have if "_before_" in name),
        default="",
    )
    made = []
    with transaction.atomic(), connection.cursor() as cursor:
        for ahead in range(months_ahead + 1):
            start, end = _month(now, ahead), _month(now, ahead + 1)
            name = partition_name(start)
            if name in have or f"{start:%Y_%m}" < covered:
                continue
            # A range the DEFAULT partition holds rows of cannot be made: lift them out first.
            cursor.execute(
                f"CREATE TEMPORARY TABLE incidents_moving ON COMMIT DROP AS "
                f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE received_at >= %s "
                f"AND received_at < %s RETURNING *) SELECT * FROM moved",
                [start, end],
            )
            made.append(_make_partition(cursor, name, start, end))
            cursor.execute(f"INSERT INTO {TABLE} SELECT * FROM incidents_moving")
            cursor.execute("DROP TABLE incidents_moving")
    return {"made": made}


def _make_partition(cursor, name: str, start: datetime | None, end: datetime | None) -> str:
    """The partition for ``[start, end)`` (both None: the DEFAULT one), with its unique client
    ids."""
    values = (
        "DEFAULT"
        if start is None or end is None
        else f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )
    cursor.execute(f"CREATE TABLE {name} PARTITION OF {TABLE} {values}")
    cursor.execute(f"CREATE UNIQUE INDEX {name[:50]}_client ON {name} (project_id, client_id)")
    return name
