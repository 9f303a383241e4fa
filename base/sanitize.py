"""Make client-supplied JSON safe to store.

PostgreSQL refuses NUL characters in text and JSON, lone UTF-16 surrogates cannot be encoded,
and NaN/Infinity are not JSON (Python's parser accepts them). Any of these would turn a client's
body into a 500; we store the closest faithful value instead.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator

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


# Types orjson would write in its own way (datetimes, dataclasses, str/int/dict/list subclasses)
# are refused instead, so that clean_json decides what they become.
_DUMPS_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _nesting(text: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings aside)."""
    depth = deepest = 0
    for byte in _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def clean_json_text(value: Any) -> tuple[str, Any]:
    """``(JSON text, value)`` of ``clean_json(value)``, without walking it when it is clean.

    Most payloads need no cleaning, and orjson's text shows it: orjson refuses lone surrogates
    (and huge integers, non-text keys, odd types), writes NUL as ``\\u0000`` (a literal
    backslash-u0000 is a false alarm that only costs the walk), writes NaN and infinities as
    null just as clean_json does, and nothing is cut for depth when the brackets nest no deeper
    than MAX_DEPTH. Anything else takes clean_json's walk. The value returned is ``value``
    itself when its text needed no cleaning (NaN or infinities stay in it, null in the text):
    do not mutate it."""
    try:
        text = orjson.dumps(value, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    else:
        if b"\\u0000" not in text and (
            text.count(b"[") + text.count(b"{") <= MAX_DEPTH or _nesting(text) <= MAX_DEPTH
        ):
            return text.decode(), value
    cleaned = clean_json(value)
    return json.dumps(cleaned), cleaned


def _clean_text_field(value: Any) -> Any:
    return clean_text(value) if isinstance(value, str) else value


CleanText = Annotated[str, AfterValidator(_clean_text_field)]
"""Text from a client, stored: NUL characters dropped and lone surrogates replaced
(``clean_text``), as ingestion stores them."""
