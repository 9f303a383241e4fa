"""How the API reads request bodies and shapes its answers, shared by both doors: the
NinjaAPI (``metaclaw_site/api.py``) and the ASGI fast lane (``base/fast_lane.py``).
A leaf module: it imports no app, so an app's API module can import it without pulling in
the composition root."""

from __future__ import annotations

import json
from typing import Any

import orjson
from ninja.responses import NinjaJSONEncoder
from pydantic import ValidationError as PydanticValidationError

from base.errors import Conflict, DomainError, NotFound, PermissionDenied


def parse_json(body: bytes) -> Any:
    """orjson for request bodies (several times faster on 5 MB batches). Python's parser, which
    also accepts NaN and Infinity as some clients send them, takes over when orjson refuses.
    Both doors (ninja, the ASGI fast lane) parse with this."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


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
