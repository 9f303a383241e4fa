"""Make client-supplied JSON safe to store.

PostgreSQL refuses NUL characters in text and JSON, lone UTF-16 surrogates cannot be encoded,
and NaN/Infinity are not JSON (Python's parser accepts them). Any of these would turn a client's
body into a 500; we store the closest faithful value instead.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 64


def clean_text(value: str) -> str:
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def clean_json(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        return None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v, depth + 1) for v in value]
    if isinstance(value, bool | int) or value is None:
        return value
    return clean_text(str(value))
