"""Proxied turns recorded as trajectories, in batches by a background *recorder* thread, off the
response path, through incidents' services (the one writer of trajectories)."""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from django.db import close_old_connections
from django.utils import timezone

from base.sanitize import clean_json, clean_text

logger = logging.getLogger(__name__)


def _loads(data: bytes) -> Any:
    # orjson refuses NaN and lone surrogates, which PostgreSQL would refuse too.
    return orjson.loads(data)


# --- Recording turns ----------------------------------------------------------------------


@dataclass
class Turn:
    """One proxied turn, as the proxy saw it. The recorder parses the response, not the
    request path."""

    project_id: int
    session_id: str
    turn_type: str
    agent_name: str
    policy_version: int
    requested_model: str
    model: str
    messages: list[Any]
    tools: list[Any]
    # Each injected skill: slug, revision (number), revision_id, score and rank (1 = best).
    skills: list[dict[str, Any]]
    status_code: int
    latency_ms: float
    response_body: bytes = b""
    stream: bool = False
    # The request body held an escaped NUL character: clean messages before storing them.
    needs_cleaning: bool = False
    error: str = ""
    occurred_at: Any = None
    # What retrieval looked at and the threshold it applied: {"query": ..., "min_score": ...}.
    retrieval: dict[str, Any] | None = None


def _parse_response(turn: Turn) -> tuple[Any, int | None, int | None]:
    """(assistant message or error body, prompt tokens, completion tokens)."""
    if turn.error:
        return {"error": turn.error}, None, None
    if not turn.stream:
        try:
            body = _loads(turn.response_body or b"null")
        except ValueError:
            return {"raw": turn.response_body[:2000].decode("utf-8", "replace")}, None, None
        if turn.status_code >= 400 or not isinstance(body, dict):
            return body, None, None
        usage = _dict(body.get("usage"))
        choices = body.get("choices")
        first = _dict(choices[0]) if isinstance(choices, list) and choices else {}
        return first.get("message"), usage.get("prompt_tokens"), usage.get("completion_tokens")
    content: list[str] = []
    tool_calls: dict[int, dict[str, Any]] = {}
    usage: dict[str, Any] = {}
    for line in turn.response_body.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            chunk = _loads(data)
        except ValueError:
            continue
        if not isinstance(chunk, dict):  # a malformed line (``data: 1``) is skipped
            continue
        usage = _dict(chunk.get("usage")) or usage
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            delta = _dict(_dict(choice).get("delta"))
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if not isinstance(call, dict):
                    continue
                index = call.get("index", 0)
                slot = tool_calls.setdefault(
                    index if isinstance(index, int) else 0,
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if isinstance(call.get("id"), str) and call["id"]:
                    slot["id"] = call["id"]
                fn = _dict(call.get("function"))
                for part in ("name", "arguments"):
                    if isinstance(fn.get(part), str):
                        slot["function"][part] += fn[part]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if tool_calls:
        message["tool_calls"] = [tool_calls[i] for i in sorted(tool_calls)]
    return message, usage.get("prompt_tokens"), usage.get("completion_tokens")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def proxy_turns_record(*, turns: Sequence[Turn]) -> int:
    """Store proxied turns as trajectories (source=proxy), stamped with their policy version.
    Returns how many were stored.

    The rows are written by ``incidents.ingest.trajectories_store`` (one ``COPY`` on
    PostgreSQL)."""
    from incidents import ingest as incident_ingest
    from incidents.models import Trajectory, TrajectorySource

    rows = []
    now = timezone.now()
    for turn in turns:
        try:
            response, prompt_tokens, completion_tokens = _parse_response(turn)
        except Exception:  # noqa: BLE001 - one odd answer must not lose the other turns
            logger.exception("Could not parse the upstream answer of a proxied turn.")
            raw = (turn.response_body or b"")[:2000].decode("utf-8", "replace")
            response, prompt_tokens, completion_tokens = {"raw": raw}, None, None
        # Messages parsed by a strict JSON parser hold no NaN and no lone surrogates; only
        # NUL characters, which PostgreSQL refuses, need cleaning (the proxy flags those).
        clean = clean_json if turn.needs_cleaning else _identity
        rows.append(
            Trajectory(
                id=uuid.uuid4(),
                project_id=turn.project_id,
                session_id=clean_text(turn.session_id)[:200],
                turn_type=turn.turn_type,
                source=TrajectorySource.PROXY,
                agent_name=clean_text(turn.agent_name)[:200],
                policy_version=turn.policy_version,
                model=clean_text(turn.model)[:200],
                messages=clean(turn.messages),
                response=clean_json(response),
                tools=clean(turn.tools),
                skills_injected=turn.skills,
                latency_ms=round(turn.latency_ms, 3),
                prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
                completion_tokens=completion_tokens if isinstance(completion_tokens, int) else None,
                status_code=turn.status_code,
                metadata={
                    "requested_model": clean_text(turn.requested_model),
                    "stream": turn.stream,
                    **({"retrieval": clean_json(turn.retrieval)} if turn.retrieval else {}),
                },
                occurred_at=turn.occurred_at or now,
                received_at=now,
            )
        )
    return incident_ingest.trajectories_store(trajectories=rows)


def _identity(value: Any) -> Any:
    return value


class _Recorder:
    """Writes turns from a queue in batches on its own thread: the answer never waits for the
    database, and a database outage drops recordings (logged), never answers."""

    MAX_QUEUE = 50_000
    MAX_BATCH = 500
    CHUNK = 25

    def __init__(self) -> None:
        self.queue: queue.Queue[Turn] = queue.Queue(maxsize=self.MAX_QUEUE)
        self.pending = 0
        self.cond = threading.Condition()
        self.started = False
        self.dropped = 0

    def hold(self) -> None:
        """Count a turn that will be submitted later (a stream being relayed), so ``wait``
        cannot return before it is written."""
        with self.cond:
            self.pending += 1

    def submit(self, turn: Turn, *, held: bool = False) -> None:
        if not self.started:
            with self.cond:
                if not self.started:
                    threading.Thread(
                        target=self._run, name="metaclaw-runtime-recorder", daemon=True
                    ).start()
                    self.started = True
        if not held:
            with self.cond:
                self.pending += 1
        try:
            self.queue.put_nowait(turn)
        except queue.Full:
            self.dropped += 1
            self._done(1)
            logger.warning("Recorder queue full: a proxied turn was not recorded.")

    def _done(self, n: int) -> None:
        with self.cond:
            self.pending -= n
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self.queue.get(timeout=0.02))
                except queue.Empty:
                    break
            try:
                close_old_connections()
                # Small chunks, yielding the GIL between them: the event loop serving
                # requests must not wait a whole switch interval behind a big batch.
                for start in range(0, len(batch), self.CHUNK):
                    chunk = batch[start : start + self.CHUNK]
                    try:
                        proxy_turns_record(turns=chunk)
                    except Exception:  # noqa: BLE001 - recording must never take the proxy down
                        logger.exception("Could not record %d proxied turns.", len(chunk))
                    time.sleep(0)
            finally:
                close_old_connections()  # with the pool: back to it until the next batch
                self._done(len(batch))

    def wait(self, timeout: float = 10.0) -> bool:
        """Block until every submitted turn is written (tests, shutdown). True when drained."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


recorder = _Recorder()
atexit.register(lambda: recorder.wait(5.0))


def recordings_wait(timeout: float = 10.0) -> bool:
    """Wait for pending recordings of this process to be written."""
    return recorder.wait(timeout)
