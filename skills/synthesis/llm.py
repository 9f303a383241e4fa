"""The one module that talks to an LLM: any OpenAI-compatible endpoint through the official
``openai`` SDK (OpenAI, vLLM, Ollama, a gateway).

The interface is narrow on purpose: ``complete_json(messages, schema)`` returns the parsed JSON
object, the token usage and the model that answered. It asks for structured output
(``response_format`` with a JSON schema) and, for endpoints that refuse it, falls back to plain
completions read by a tolerant parser (code fences stripped, the first JSON object found).

Errors:
- ``LlmNotConfigured``: no base URL / model; not an error for callers (the group waits for a
  person);
- ``LlmTransientError``: rate limits, timeouts, 5xx and connection errors that outlived the
  SDK's in-process retries (with backoff, honouring a short ``Retry-After``); the Celery task
  retries later, after the ``retry_after`` it carries;
- ``LlmPermanentError``: the endpoint refused the request (bad key, unknown model, 4xx);
- ``LlmInvalidOutput``: the answer holds no JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import openai
from django.conf import settings

logger = logging.getLogger(__name__)

# Tries of one call, the SDK's retries included (its backoff: 0.5 s doubling, jitter, Retry-After
# honoured); longer outages are the Celery task's business.
MAX_ATTEMPTS = 3
# The first backoff without a Retry-After (the SDK's 0.5 s, doubling, scaled to this).
BACKOFF_BASE_SECONDS = 0.5
SDK_BACKOFF_BASE_SECONDS = 0.5
# A Retry-After longer than this is not slept through in the worker: the task retries later.
MAX_INLINE_RETRY_AFTER_SECONDS = 20.0
# One call, the SDK's tries and backoff included, ends within LLM["DEADLINE_SECONDS"] (default
# this many timeouts): a hanging endpoint holds a worker slot that long per task try, not
# ``MAX_ATTEMPTS`` full timeouts. A retry starts only with at least this much time left.
DEFAULT_DEADLINE_TIMEOUTS = 1.5
MIN_TRY_SECONDS = 0.1


class LlmError(Exception):
    """Base class; ``str(exc)`` is shown to people on the group page."""


class LlmNotConfigured(LlmError):
    pass


class LlmTransientError(LlmError):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LlmPermanentError(LlmError):
    pass


class LlmInvalidOutput(LlmError):
    def __init__(self, message: str, *, content: str = "", usage: Usage | None = None) -> None:
        super().__init__(message)
        self.content = content
        self.usage = usage or Usage()


@dataclass(frozen=True)
class Usage:
    tokens_in: int = 0
    tokens_out: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.tokens_in + other.tokens_in, self.tokens_out + other.tokens_out)


@dataclass(frozen=True)
class Completion:
    parsed: dict[str, Any]
    content: str
    usage: Usage
    model: str


@dataclass(frozen=True)
class LlmConfig:
    base_url: str
    api_key: str
    model: str
    timeout: float
    deadline: float


def config() -> LlmConfig | None:
    """The configured endpoint, or None when no LLM is configured (base URL or model missing)."""
    llm = getattr(settings, "LLM", {}) or {}
    base_url = (llm.get("BASE_URL") or "").strip()
    model = (llm.get("MODEL") or "").strip()
    if not base_url or not model:
        return None
    return LlmConfig(
        base_url=base_url,
        # Local servers (vLLM, Ollama) accept any key; the SDK insists on one.
        api_key=llm.get("API_KEY") or "not-needed",
        model=model,
        timeout=(timeout := float(llm.get("TIMEOUT_SECONDS") or 30)),
        deadline=float(llm.get("DEADLINE_SECONDS") or timeout * DEFAULT_DEADLINE_TIMEOUTS),
    )


def is_configured() -> bool:
    return config() is not None


_clients: dict[tuple, openai.OpenAI] = {}
_clients_lock = threading.Lock()
# Endpoints that answered 400 to ``response_format``: later calls go straight to plain mode.
_no_structured_output: set[str] = set()
# When this thread's call must end (``time.monotonic()``), while ``complete_json`` runs.
_call = threading.local()


class _DeadlinePassed(Exception):
    """No time is left for another try of the call (``_Client._sleep_for_retry``)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _seconds_left() -> float | None:
    deadline = getattr(_call, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


class _Client(openai.OpenAI):
    """The SDK's client, whose retries (backoff with jitter, ``Retry-After`` honoured) we use,
    except that it does not sleep through a ``Retry-After`` longer than
    ``MAX_INLINE_RETRY_AFTER_SECONDS``: it would hold one of the few fast worker slots (the SDK
    waits up to two minutes) while other groups queue. Such a wait is handed to the Celery task,
    whose countdown honours it without holding a worker."""

    def _should_retry(self, response: Any) -> bool:
        retry_after = _retry_after_from(response.headers)
        if retry_after is not None and retry_after > MAX_INLINE_RETRY_AFTER_SECONDS:
            return False
        return super()._should_retry(response)

    def _calculate_retry_timeout(
        self, remaining_retries: int, options: Any, response_headers: Any = None
    ) -> float:
        delay = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        if response_headers is not None and _retry_after_from(response_headers) is not None:
            return delay  # the server's word
        return delay * BACKOFF_BASE_SECONDS / SDK_BACKOFF_BASE_SECONDS

    def _prepare_options(self, options: Any) -> Any:
        # Each try gets the configured timeout, or what is left of the call's deadline.
        options = super()._prepare_options(options)
        left = _seconds_left()
        if left is not None and isinstance(self.timeout, int | float):
            options.timeout = max(MIN_TRY_SECONDS, min(float(self.timeout), left))
        return options

    def _sleep_for_retry(
        self, *, retries_taken: int, max_retries: int, options: Any, response: Any
    ) -> None:
        left = _seconds_left()
        delay = self._calculate_retry_timeout(
            max_retries - retries_taken, options, response.headers if response else None
        )
        if left is not None and left - delay < MIN_TRY_SECONDS:
            if response is None:
                raise _DeadlinePassed("the last try timed out or lost its connection")
            raise _DeadlinePassed(
                f"the last try got HTTP {response.status_code}",
                retry_after=_retry_after_from(response.headers),
            )
        time.sleep(delay)


def _client(cfg: LlmConfig) -> openai.OpenAI:
    # One client (and connection pool) per process and endpoint; keyed by pid so a forked
    # worker never shares a parent's sockets.
    key = (os.getpid(), cfg.base_url, cfg.api_key, cfg.timeout, MAX_ATTEMPTS)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _Client(
                base_url=cfg.base_url,
                api_key=cfg.api_key,
                timeout=cfg.timeout,
                max_retries=MAX_ATTEMPTS - 1,
            )
            _clients[key] = client
        return client


def preload() -> None:
    """Import what the SDK imports lazily on its first call (about 0.1 s here). A worker calls
    this before its pool forks, so no child pays for it in front of a proposal. The client is
    thrown away: it opened no connection, and each process makes its own (``_client``)."""
    client = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="preload")
    client.chat.completions.create  # noqa: B018 - the access imports them


def client_prepare() -> None:
    """Build this process's client for the configured endpoint now (a worker's child calls it
    before its first task), so that the first proposal does not wait for it."""
    cfg = config()
    if cfg is not None:
        _client(cfg)


def complete_json(
    messages: list[dict[str, Any]],
    schema: dict[str, Any],
    *,
    schema_name: str = "answer",
    temperature: float = 0.2,
    max_tokens: int = 1500,
) -> Completion:
    """Ask for one JSON object matching ``schema``. Raises the errors above."""
    cfg = config()
    if cfg is None:
        raise LlmNotConfigured("No LLM is configured (OPENAI_BASE_URL and METACLAW_LLM_MODEL).")
    client = _client(cfg)
    structured = cfg.base_url not in _no_structured_output
    kwargs: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": schema_name, "schema": schema, "strict": False},
    }
    # Read by _Client's hooks on this thread; every call sets its own, so one left by a call
    # that raised is never used.
    _call.deadline = time.monotonic() + cfg.deadline
    while True:
        try:
            # The SDK's own request method (``client.post``, documented for endpoints it has no
            # method for): its errors, retries and hooks as always, without building the
            # body's typed form or the answer's models. For the four fields used below that
            # was about 0.5 ms of CPU a synthesis (40 % of the call), measured against
            # ``chat.completions.create`` on our loopback server.
            body = _completion_body(
                client.post(
                    "/chat/completions",
                    cast_to=str,
                    body={**kwargs, "response_format": response_format} if structured else kwargs,
                )
            )
            break
        except openai.BadRequestError as exc:
            if structured and _mentions_response_format(exc):
                logger.info("%s refuses response_format; using plain JSON mode.", cfg.base_url)
                _no_structured_output.add(cfg.base_url)
                structured = False
                continue
            raise LlmPermanentError(f"The LLM endpoint refused the request: {_brief(exc)}") from exc
        except openai.RateLimitError as exc:
            raise LlmTransientError(
                f"LLM rate limited (429): {_brief(exc)}", retry_after=_retry_after(exc)
            ) from exc
        except openai.APIStatusError as exc:
            if exc.status_code in (408, 409) or exc.status_code >= 500:
                raise LlmTransientError(
                    f"LLM server error ({exc.status_code}): {_brief(exc)}",
                    retry_after=_retry_after(exc),
                ) from exc
            raise LlmPermanentError(
                f"The LLM endpoint refused the request ({exc.status_code}): {_brief(exc)}"
            ) from exc
        except openai.APITimeoutError as exc:
            raise LlmTransientError(f"LLM timed out after {cfg.timeout:g} s") from exc
        except _DeadlinePassed as exc:
            raise LlmTransientError(
                f"LLM gave no answer within the call's deadline of {cfg.deadline:g} s ({exc})",
                retry_after=exc.retry_after,
            ) from exc
        except openai.APIConnectionError as exc:
            raise LlmTransientError(f"Could not reach the LLM: {_brief(exc)}") from exc
        except (openai.APIResponseValidationError, ValueError) as exc:
            # A 200 whose body is not a chat completion (a broken proxy, a truncated answer).
            raise LlmInvalidOutput(f"The LLM endpoint answered garbage: {_brief(exc)}") from exc

    usage_body = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    usage = Usage(
        tokens_in=_count(usage_body.get("prompt_tokens")),
        tokens_out=_count(usage_body.get("completion_tokens")),
    )
    choices = body.get("choices") if isinstance(body.get("choices"), list) else []
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    content = content if isinstance(content, str) else ""
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    model = model or cfg.model
    parsed = parse_json_object(content)
    if parsed is None:
        raise LlmInvalidOutput(
            "The LLM's answer holds no JSON object.", content=content, usage=usage
        )
    return Completion(parsed=parsed, content=content, usage=usage, model=model)


def _completion_body(content: str) -> dict[str, Any]:
    """A 200's body as a chat completion object; ValueError when it is not one (a broken
    proxy, a truncated answer)."""
    body = json.loads(content)
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise ValueError("the body is not a chat completion")
    return body


def _count(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as infinity
        return 0


def _retry_after(exc: Exception) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    return None if headers is None else _retry_after_from(headers)


def _retry_after_from(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _mentions_response_format(exc: openai.BadRequestError) -> bool:
    text = str(exc).lower()
    return "response_format" in text or "json_schema" in text or "structured" in text


def _brief(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."


# --- Tolerant JSON parsing ------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text``: the whole text, a fenced block, or the first balanced
    ``{...}`` that parses. None when there is none."""
    if not text:
        return None
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
