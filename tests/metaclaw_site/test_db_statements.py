"""How the project talks to PostgreSQL."""

from __future__ import annotations

import pytest
from django.db import connection

from metaclaw_site.models import Project

pytestmark = pytest.mark.django_db


def test_a_statement_run_often_is_prepared_on_the_server():
    """The fast loop runs the same statements for every synthesis: prepared, PostgreSQL stops
    parsing and planning them (``METACLAW_DB_PREPARED_STATEMENTS``, on by default)."""
    for _ in range(6):
        assert list(Project.objects.filter(slug="no-such-project-here")) == []

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s",
            ["%no-such%"],
        )
        prepared = cursor.fetchall()
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
            ['%FROM "metaclaw_site_project" WHERE "metaclaw_site_project"."slug" = $1%'],
        )
        (count,) = cursor.fetchone()

    assert prepared == []  # the value travelled apart from the SQL, not quoted into it
    assert count == 1


def test_a_prepared_statement_is_still_planned_for_its_values():
    with connection.cursor() as cursor:
        cursor.execute("SHOW plan_cache_mode")
        assert cursor.fetchone() == ("force_custom_plan",)
