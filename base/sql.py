"""Pieces of the few statements still written out in SQL; each such place says why the ORM will
not do. The ingestion hot path's (``incidents.ingest_sql``) are measured against an ORM version
of the same ingest by ``benchmarks/ingest_orm.py``."""

from __future__ import annotations

from django.db import models


def columns(model: type[models.Model]) -> str:
    """The model's columns, named: a process keeps reading what its model knows while a
    migration adds a column (``SELECT *`` would hand it the new one as an extra attribute)."""
    return ", ".join(field.column for field in model._meta.concrete_fields)


def placeholders(values: list) -> str:
    """``%s, %s, …`` for an ``IN (…)`` of ``values`` (portable, unlike ``= ANY(%s)``)."""
    return ", ".join(["%s"] * len(values))
