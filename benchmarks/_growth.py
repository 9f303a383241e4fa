"""Grow a benchmark project's tables to a stated size, fast, for the figures printed at two sizes.

Issue 18 asks every benchmark to print its figure at two sizes (10k and 1M incidents, 1k and
100k skills...) so that growth is visible. Loading a million rows through the ORM takes minutes;
copying the rows a benchmark already loaded, inside PostgreSQL, takes seconds and keeps their
shape (the same groups, agents and message sizes), which is what the indexes see.
"""

from __future__ import annotations

import time


def grow_incidents(project_id: int, target: int) -> float:
    """Copy the project's incidents (new ids and client ids) until it holds ``target`` rows.

    The group counters are brought in line afterwards, so the pages read consistent figures.
    Returns the seconds it took.
    """
    from django.db import DatabaseError, connection, transaction

    from incidents.models import Incident, IncidentGroup

    started = time.perf_counter()
    table = Incident._meta.db_table
    columns = ", ".join(
        f'"{field.column}"'
        for field in Incident._meta.concrete_fields
        if field.column not in ("id", "client_id")
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table} WHERE project_id = %s", [project_id])
        have = cursor.fetchone()[0]
        if have == 0:
            raise ValueError("grow_incidents copies existing rows: load at least one first")
        while have < target:
            take = min(have, target - have)
            cursor.execute(
                f"""
                INSERT INTO {table} (id, client_id, {columns})
                SELECT gen_random_uuid(), client_id || '~' || %s, {columns}
                FROM {table} WHERE project_id = %s LIMIT %s
                """,
                # The count before this round: unique across rounds and calls.
                [have, project_id, take],
            )
            have += take
        cursor.execute(
            f"""
            UPDATE {IncidentGroup._meta.db_table} g SET event_count = c.n
            FROM (SELECT group_id, count(*) AS n FROM {table} WHERE project_id = %s
                  GROUP BY group_id) c
            WHERE g.id = c.group_id
            """,
            [project_id],
        )
    with connection.cursor() as cursor:
        # A table in its steady state, as autovacuum keeps it (off on the machines here): the
        # copies' visibility recorded, and the load's dirty pages written, so that the figures
        # at this size measure the size, not a checkpoint of the bulk load running meanwhile.
        cursor.execute(f"VACUUM (ANALYZE) {table}")
        try:
            cursor.execute("CHECKPOINT")
        except DatabaseError:  # a role without pg_checkpoint: the server checkpoints on its own
            pass
    return time.perf_counter() - started


def parse_sizes(text: str) -> list[int]:
    """``"10000,1000000"`` or ``"10k,1M"`` → ``[10000, 1000000]``, ascending."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        sizes.append(int(float(part.rstrip("km")) * scale))
    return sorted(sizes)
