"""Keyset (cursor) pagination: stable under inserts, constant cost for any page."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet

from base.errors import DomainError


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else str(v) for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, count: int) -> list[str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()).decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DomainError("The cursor is not valid.", field="cursor") from exc
    if not isinstance(values, list) or len(values) != count:
        raise DomainError("The cursor is not valid.", field="cursor")
    return [str(v) for v in values]


def paginate(
    queryset: QuerySet, *, time_field: str, cursor: str | None, limit: int
) -> tuple[list[Any], str | None]:
    """Newest first by ``(time_field, pk)``. Returns the page and the next cursor (or None)."""
    qs = queryset.order_by(f"-{time_field}", "-pk")
    if cursor:
        stamp, pk = decode_cursor(cursor, 2)
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError as exc:
            raise DomainError("The cursor is not valid.", field="cursor") from exc
        pk_field = queryset.model._meta.pk
        try:
            pk_value = pk_field.to_python(pk)
        except Exception as exc:  # noqa: BLE001 - any bad pk is a bad cursor
            raise DomainError("The cursor is not valid.", field="cursor") from exc
        qs = qs.filter(
            Q(**{f"{time_field}__lt": when}) | Q(**{time_field: when, "pk__lt": pk_value})
        )
    items = list(qs[: limit + 1])
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        next_cursor = encode_cursor([getattr(last, time_field), last.pk])
    return items, next_cursor
