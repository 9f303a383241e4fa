from __future__ import annotations

from datetime import UTC, datetime, timedelta

from incidents.ingest_sql import _is_instant

NOW = datetime(2026, 11, 25, 22, 8, 17, 123456, tzinfo=UTC)


def test_a_timestamp_read_back_raw_is_recognised_from_either_database():
    # PostgreSQL: aware datetime; SQLite: naive UTC datetime or its text.
    assert _is_instant(NOW, NOW)
    assert _is_instant(NOW.replace(tzinfo=None), NOW)
    assert _is_instant("2026-11-25 22:08:17.123456", NOW)


def test_other_instants_and_garbage_are_not_it():
    assert not _is_instant(NOW - timedelta(microseconds=1), NOW)
    assert not _is_instant("2026-11-25 22:08:17", NOW)
    assert not _is_instant("not a date", NOW)
    assert not _is_instant(None, NOW)
