"""How the API reads request bodies and shapes its answers, shared by both doors: the
NinjaAPI (``metaclaw_site/api.py``) and the ASGI fast lane (``base/fast_lane.py``).
A leaf module: it imports no app, so an app's API module can import it without pulling in
the composition root."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from django.db.models import QuerySet
from ninja import Schema
from ninja.responses import NinjaJSONEncoder
from pydantic import AfterValidator, BeforeValidator, Strict, WithJsonSchema
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from base.errors import Conflict, DomainError, NotFound, PermissionDenied
from base.pagination import paginate


def parse_json(body: bytes) -> Any:
    """orjson for request bodies (several times faster on 5 MB batches). Python's parser, which
    also accepts NaN and Infinity as some clients send them, takes over when orjson refuses.
    Both doors (ninja, the ASGI fast lane) parse with this."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


class BodyNotAnObject(ValueError):
    """A request body that is JSON but not an object (every body of this API is one)."""


NOT_AN_OBJECT = [
    {"field": "body", "message": "Input should be a JSON object", "type": "model_type"}
]


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """``parse_json`` for a request body: a JSON object, or null where the body is optional.
    ninja's ``Schema`` would read anything else (``false``, a list) as an object with no
    fields, its defaults; ``BodyNotAnObject`` says so instead (both doors answer 422)."""
    data = parse_json(body)
    if data is not None and not isinstance(data, dict):
        raise BodyNotAnObject("The request body must be a JSON object.")
    return data


def objects_only(data: Any) -> Any:
    """A ``model_validator(mode="before")`` for a nested ninja ``Schema`` of an input: refuse
    what is not an object (a ``Schema`` reads a list's attributes as missing: its defaults).
    ninja may hand it the input wrapped in its attribute reader (``_obj`` holds the input)."""
    if isinstance(getattr(data, "_obj", data), list | str | int | float):
        raise PydanticCustomError("model_type", "Input should be an object")
    return data


def render_json(data: Any) -> bytes:
    """A response body byte for byte as ``api.create_response`` renders it (the fast lane
    answers the same bytes as the Django door)."""
    return json.dumps(data, cls=NinjaJSONEncoder).encode()


def _field_name(loc: list | tuple) -> str:
    # ninja prefixes locations with the parameter source ("body", "query", payload name).
    parts = [str(p) for p in loc]
    while parts and parts[0] in {"body", "query", "path", "header", "payload", "item", "items"}:
        if parts[0] == "items" and len(parts) > 1 and parts[1].isdigit():
            break
        parts = parts[1:]
    return ".".join(parts) or "body"


def pydantic_errors(exc: PydanticValidationError) -> list[dict]:
    """The API's error list for a pydantic error raised outside ninja (both doors)."""
    return validation_errors(
        exc.errors(include_url=False, include_context=False, include_input=False)
    )


def validation_errors(errors: list[dict]) -> list[dict]:
    return [
        {
            "field": _field_name(err.get("loc", ())),
            "message": err.get("msg", "invalid"),
            "type": err.get("type", "value_error"),
        }
        for err in errors
    ]


def invalid_body(errors: list[dict]) -> dict:
    """The 422 body for input that failed validation (``errors`` from ``validation_errors``)."""
    return {"detail": "Invalid input.", "code": "invalid", "errors": errors}


def domain_error_answer(exc: DomainError) -> tuple[int, dict]:
    """Status and body for a refused business rule (both doors)."""
    status = 400
    if isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, Conflict):
        status = 409
    elif isinstance(exc, PermissionDenied):
        status = 403
    elif exc.field:
        status = 422
    body: dict = {"detail": str(exc), "code": exc.code}
    if exc.field:
        body["errors"] = [{"field": exc.field, "message": str(exc), "type": exc.code}]
    return status, body


# --- The one error shape, as the OpenAPI document declares it ----------------------------------

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "description": "Every error the API answers, on every route and from both doors.",
    "required": ["detail", "code"],
    "properties": {
        "detail": {"type": "string", "description": "What went wrong, for people."},
        "code": {"type": "string", "description": "What went wrong, for programs."},
        "errors": {
            "type": "array",
            "description": "One entry a field that was refused (400 and 422).",
            "items": {
                "type": "object",
                "required": ["field", "message", "type"],
                "properties": {
                    "field": {"type": "string"},
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
        "retry_after": {"type": "integer", "description": "429: seconds to wait."},
        "limit_bytes": {"type": "integer", "description": "413: the largest body accepted."},
    },
}

ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request: a body that is not JSON, a NUL character in a query parameter, "
    "or a refused business rule.",
    401: "No valid API key (`Authorization: Bearer <key>`).",
    403: "The key lacks the scope this operation needs.",
    404: "No such object in the key's project.",
    409: "The object is not in a state that allows this.",
    413: "The request body is over the route's limit.",
    422: "The input failed validation: `errors` names each field.",
    429: "Over the key's rate limit, or too many wrong keys from this address (`Retry-After`).",
    500: "An unexpected error; it is logged.",
    503: "A service the API depends on (the database) is unavailable; try again.",
}
# The ``code`` of an error that says no more than its status.
ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def declare_errors(openapi: dict[str, Any]) -> dict[str, Any]:
    """Add the error shape and ``ERROR_STATUSES`` to every operation of ``openapi``."""
    components = openapi.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path_item in openapi.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in _METHODS:
                continue
            # ninja keys an operation's own statuses by int: one key for each, as JSON has it.
            responses = {
                str(status): answer for status, answer in operation.get("responses", {}).items()
            }
            operation["responses"] = responses
            for status, description in ERROR_STATUSES.items():
                own = responses.get(str(status))
                if own is None:
                    responses[str(status)] = {"description": description, "content": error}
                else:
                    _or_error(own)
    return openapi


def _or_error(response: dict[str, Any]) -> None:
    """An error status an operation documents itself may still answer in the one shape
    (input that fails validation before the handler runs): its schema or the Error."""
    content = response.setdefault("content", {}).setdefault("application/json", {})
    schema = content.get("schema")
    ref = {"$ref": "#/components/schemas/Error"}
    if schema is None:
        content["schema"] = ref
    elif schema != ref and ref not in schema.get("anyOf", ()):
        content["schema"] = {"anyOf": [schema, ref]}


# --- Timestamps PostgreSQL can take -------------------------------------------------------------

# RFC 3339's date-time; the offset may be left out (read as the server's time zone, as before).
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})?"
)
_PG_MAX_OFFSET = timedelta(hours=15, minutes=59)


def _rfc3339_only(value: Any) -> Any:
    # pydantic would also read numbers (and numeric text) as Unix times: "until=-1141".
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise PydanticCustomError(
            "datetime_format", "Input should be an RFC 3339 date-time, e.g. 2025-01-31T09:30:00Z"
        )
    return value


def _postgres_ready(value: datetime) -> datetime:
    """``value`` as the same instant in UTC when its offset is one PostgreSQL refuses (beyond
    ±15:59) or reads back out of Python's range (year 1 or 9999); the first or last instant
    Python can hold when that instant lies beyond them."""
    offset = value.utcoffset()
    if offset is None or (abs(offset) <= _PG_MAX_OFFSET and 1 < value.year < 9999):
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return (datetime.min if offset > timedelta(0) else datetime.max).replace(tzinfo=UTC)


ApiDateTime = Annotated[
    datetime,
    BeforeValidator(_rfc3339_only),
    AfterValidator(_postgres_ready),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A timestamp an API client sends: RFC 3339 text only, with any UTC offset (stored in UTC when
PostgreSQL would refuse it)."""


class PagedFilter(Schema):
    """The query of a list the API pages newest first: a time range, the cursor the last page
    gave and a ``limit`` of 1 to 200. A list's filter adds its own fields."""

    since: ApiDateTime | None = None
    until: ApiDateTime | None = None
    cursor: str | None = None
    limit: int = 50

    def narrowing(self) -> dict[str, Any]:
        """The filters, as the list's selector takes them (the paging left out)."""
        return self.model_dump(exclude={"cursor", "limit"})

    def page(self, queryset: QuerySet, *, time_field: str) -> dict[str, Any]:
        """This query's page of ``queryset``: its ``items`` and the ``next_cursor``."""
        if not 1 <= self.limit <= 200:
            raise DomainError("limit must be between 1 and 200.", field="limit")
        items, next_cursor = paginate(
            queryset, time_field=time_field, cursor=self.cursor, limit=self.limit
        )
        return {"items": items, "next_cursor": next_cursor}


# --- Numbers in a JSON body: JSON numbers only ---------------------------------------------------
# pydantic's lax mode would also read true/false and numeric text as numbers.
JsonInt = Annotated[int, Strict()]
JsonFloat = Annotated[float, Strict()]


# --- Client ids: text without control characters -------------------------------------------------

_CONTROL = r"\x00-\x1f\x7f-\x9f"
# What str.strip() takes for white space, and the byte order mark.
_SPACE = r"\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
PRINTABLE_TEXT = f"^[^{_CONTROL}]*$"
"""A JSON Schema ``pattern``: no control character (NUL, line breaks, C1)."""
PRINTABLE_ID = f"^[^{_CONTROL}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"
"""A JSON Schema ``pattern``: as ``PRINTABLE_TEXT``, and not only white space."""
_PATTERNS = {pattern: re.compile(pattern) for pattern in (PRINTABLE_TEXT, PRINTABLE_ID)}


def matches(pattern: str, value: str | None, message: str) -> str | None:
    """``value`` when it matches ``pattern`` (one of this module's); else a ValueError saying
    ``message``. The pattern is also the field's ``pattern`` in the OpenAPI document, so the
    schema and the check cannot disagree."""
    if value is not None and _PATTERNS[pattern].fullmatch(value) is None:
        raise ValueError(message)
    return value
