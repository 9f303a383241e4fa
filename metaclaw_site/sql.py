"""Pieces of the few statements written out in SQL (where the ORM's compiling cost more CPU
than PostgreSQL's run; each such place says so)."""

from __future__ import annotations

from django.db import models


def columns(model: type[models.Model]) -> str:
    """The model's columns, named: with prepared statements, ``SELECT *`` would fail in a
    process that prepared it before a migration added a column ("cached plan must not change
    result type"); a named list keeps reading what the process's model knows."""
    return ", ".join(field.column for field in model._meta.concrete_fields)


def placeholders(values: list) -> str:
    """``%s, %s, …`` for an ``IN (…)`` of ``values`` (portable, unlike ``= ANY(%s)``)."""
    return ", ".join(["%s"] * len(values))
