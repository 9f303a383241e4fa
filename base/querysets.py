"""Narrowing a list by the filters a person or a client gave, shared by every app's selectors:
a filter left empty matches everything, as it does in a query string."""

from __future__ import annotations

from typing import Any, TypeVar

from django.db.models import Model, QuerySet

_Row = TypeVar("_Row", bound=Model)


def narrowed(qs: QuerySet[_Row], **lookups: Any) -> QuerySet[_Row]:
    """``qs`` filtered by each lookup whose value was given (None, "" and 0 were not)."""
    return qs.filter(**{lookup: value for lookup, value in lookups.items() if value})
