"""An OpenAI-compatible HTTP server of our own, on loopback, for tests and benchmarks.

It plays the LLM (for skill synthesis) and the upstream model (behind the proxy) for the real
``openai`` client. It records every request, and answers from a script of ``Reply`` objects
(first in, first out) or, when the script is empty, from ``default`` (a ``Reply`` or a function
of the request body returning one).

    with OpenAIServer() as server:
        server.enqueue(Reply(content='{"decision": "no_skill", ...}'))
        server.enqueue(Reply(status=429, headers={"Retry-After": "0"}))
        client = openai.OpenAI(base_url=server.base_url, api_key="test")

The skill judge's mode (``skills.judge``): a request of the judge (its schema name, or its
system prompt's opening) is answered from a script and a default of its own
(``judge_enqueue``, ``judge_default``: a verdict that passes every criterion), so that a test
scripting the skill writer is not answered by the judge's call, and the other way round. Its
requests are in ``requests`` and ``judge_requests()``, not in ``chat_requests()``.
"""

from __future__ import annotations

import json
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer.

    - ``content``: the assistant message text of a normal completion;
    - ``tool_calls``: OpenAI tool calls to answer with (``content`` may then be None);
    - ``status`` with ``body``: an error answer (``body`` is JSON-encoded unless ``raw``);
    - ``raw``: bytes sent as is (malformed answers);
    - ``delay``: seconds to wait first (timeouts);
    - ``hang``: accept the request and never answer: the connection is held until the client
      gives up (recorded as the request's ``closed_at``) or the server stops;
    - ``usage``: token usage to report;
    - ``stream_chunks``: for ``stream: true`` requests, the text pieces to send as SSE chunks
      (defaults to ``content`` split into words).
    """

    content: str | None = "ok"
    tool_calls: list[dict[str, Any]] | None = None
    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    usage: dict[str, int] | None = None
    stream_chunks: list[str] | None = None
    finish_reason: str = "stop"
    hang: bool = False


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    # ``time.monotonic()`` when it arrived; the status answered (None: none, it hung); when a
    # hanging request's client went away.
    received_at: float = field(default_factory=time.monotonic)
    status: int | None = None
    closed_at: float | None = None


class OpenAIServer:
    def __init__(
        self, default: Reply | Callable[[dict], Reply] | None = None, model: str = "fake-model"
    ) -> None:
        self.default = default or Reply()
        self.model = model
        self.requests: list[RecordedRequest] = []
        self._script: deque[Reply] = deque()
        self.judge_default: Reply | Callable[[dict], Reply] = Reply(content=judge_answer())
        self._judge_script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> OpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # hanging requests let go
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting ---------------------------------------------------------------------------
    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def chat_requests(self) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if r.path.endswith("/chat/completions") and not is_judge_request(r.body)
        ]

    def judge_enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._judge_script.extend(replies)

    def judge_requests(self) -> list[RecordedRequest]:
        return [
            r
            for r in self.requests
            if r.path.endswith("/chat/completions") and is_judge_request(r.body)
        ]

    def _next_reply(self, body: dict) -> Reply:
        if is_judge_request(body):
            with self._lock:
                if self._judge_script:
                    return self._judge_script.popleft()
            default = self.judge_default
            return default(body) if callable(default) else default
        with self._lock:
            if self._script:
                return self._script.popleft()
        return self.default(body) if callable(self.default) else self.default

    # -- HTTP --------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without TCP_NODELAY the body, written after the headers, waits for the client's
            # delayed ACK: every answer would take tens of milliseconds, not "instantly".
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _read_json(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw.decode("utf-8", "replace")

            def _send(
                self,
                status: int,
                payload: bytes,
                headers: dict[str, str],
                ctype: str = "application/json",
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(RecordedRequest("GET", self.path, dict(self.headers), None))
                if self.path.rstrip("/").endswith("/models"):
                    body = {
                        "object": "list",
                        "data": [{"id": server.model, "object": "model", "owned_by": "fake"}],
                    }
                    self._send(200, json.dumps(body).encode(), {})
                else:
                    self._send(404, b'{"error": {"message": "not found"}}', {})

            def do_POST(self) -> None:  # noqa: N802
                body = self._read_json()
                record = RecordedRequest("POST", self.path, dict(self.headers), body)
                server.requests.append(record)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "not found"}}', {})
                    return
                reply = server._next_reply(body if isinstance(body, dict) else {})
                if reply.hang:
                    self._hang(record)
                    return
                record.status = reply.status
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.raw is not None:
                    self._send(reply.status, reply.raw, reply.headers)
                    return
                if reply.status >= 400:
                    payload = (
                        reply.body
                        if reply.body is not None
                        else {
                            "error": {
                                "message": f"fake error {reply.status}",
                                "type": "fake_error",
                                "code": reply.status,
                            }
                        }
                    )
                    self._send(reply.status, json.dumps(payload).encode(), reply.headers)
                    return
                model = (
                    (body or {}).get("model") or server.model
                    if isinstance(body, dict)
                    else server.model
                )
                if isinstance(body, dict) and body.get("stream"):
                    self._stream(reply, model)
                    return
                self._send(200, json.dumps(completion(reply, model)).encode(), reply.headers)

            def _hang(self, record: RecordedRequest) -> None:
                # Nothing is sent; the client's closing makes the socket readable (EOF).
                self.close_connection = True
                while not server._stopping.is_set():
                    readable, _, _ = select.select([self.connection], [], [], 0.1)
                    if readable:
                        break
                record.closed_at = time.monotonic()

            def _stream(self, reply: Reply, model: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                pieces = reply.stream_chunks
                if pieces is None:
                    words = (reply.content or "").split(" ")
                    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
                created = int(time.time())
                for i, piece in enumerate(pieces):
                    delta: dict[str, Any] = {"content": piece}
                    if i == 0:
                        delta["role"] = "assistant"
                    chunk = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                    self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
                    if reply.delay:
                        time.sleep(reply.delay)
                final = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}],
                    "usage": reply.usage or _usage(reply),
                }
                self._chunk(f"data: {json.dumps(final)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler


def skill_answer(
    *,
    diagnosis: str,
    slug: str,
    name: str,
    description: str,
    instructions: str,
    category: str = "common_mistakes",
) -> str:
    """A skill writer's JSON answer that proposes one new skill."""
    return json.dumps(
        {
            "diagnosis": diagnosis,
            "decision": "new_skill",
            "skill": {
                "slug": slug,
                "name": name,
                "description": description,
                "instructions": instructions,
                "category": category,
            },
        }
    )


# How the skill judge's requests are known (skills.judge.services: SCHEMA_NAME, OPENING).
JUDGE_SCHEMA_NAME = "skill_risk_judge"
JUDGE_OPENING = "You are MetaClaw's skill judge."
JUDGE_CRITERIA = ("grounded", "keeps_what_works", "specific", "safe")


def is_judge_request(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    schema = (body.get("response_format") or {}).get("json_schema") or {}
    if isinstance(schema, dict) and schema.get("name") == JUDGE_SCHEMA_NAME:
        return True
    messages = body.get("messages") or []
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    return str(first.get("content") or "").startswith(JUDGE_OPENING)


def judge_answer(fails: dict[str, tuple[list[str], str]] | None = None) -> str:
    """A judge's JSON answer: every criterion passes except those in ``fails``
    (criterion → (quotes, reason))."""
    fails = fails or {}
    criteria = {
        key: (
            {"verdict": "fail", "quotes": fails[key][0], "reason": fails[key][1]}
            if key in fails
            else {"verdict": "pass", "quotes": [], "reason": ""}
        )
        for key in JUDGE_CRITERIA
    }
    reason = "Fails: " + ", ".join(fails) if fails else "Passes every criterion."
    return json.dumps({"criteria": criteria, "reason": reason})


def _usage(reply: Reply) -> dict[str, int]:
    completion_tokens = len((reply.content or "").split())
    return {
        "prompt_tokens": 10,
        "completion_tokens": completion_tokens,
        "total_tokens": 10 + completion_tokens,
    }


def completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if reply.tool_calls else reply.finish_reason,
            }
        ],
        "usage": reply.usage or _usage(reply),
    }
