"""Loopback HTTP servers that play Slack and a webhook receiver, for tests that run the real
notification code (httpx) against them.

- ``webhook_url``: a Slack incoming webhook (``POST`` JSON ``{text, blocks}``, answers ``ok``).
- ``response_url(name)``: an interaction's ``response_url`` (answers ``{"ok": true}``).
- ``hook_url``: a generic webhook receiver that verifies MetaClaw's signature
  (``X-MetaClaw-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``) the way a
  receiver would, and answers 401 to a bad one. Each recorded post says whether it verified.

``fail_next(kind, status=500, times=1)`` makes the next requests of one kind ("webhook",
"response", "hook") fail, for retry tests.

``slack_signed_headers(secret, body)`` signs an interactivity request exactly as Slack does
(and checks the result with ``slack_sdk``'s own verifier).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from slack_sdk.signature import SignatureVerifier

WEBHOOK_PATH = "/services/T0000/B0000/XXXXXXXX"
RESPONSE_PREFIX = "/actions/"
HOOK_PATH = "/hook"


@dataclass
class Post:
    kind: str  # "webhook" | "response" | "hook" | "other"
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class SlackFake:
    def __init__(self, *, webhook_secret: str = "") -> None:
        self.webhook_secret = webhook_secret
        self.posts: list[Post] = []
        self._failures: dict[str, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, answer, content_type = fake._handle(self.path, dict(self.headers), body)
                data = answer.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> SlackFake:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def webhook_url(self) -> str:
        return self.base_url + WEBHOOK_PATH

    @property
    def hook_url(self) -> str:
        return self.base_url + HOOK_PATH

    def response_url(self, name: str = "r1") -> str:
        return self.base_url + RESPONSE_PREFIX + name

    # -- behaviour ----------------------------------------------------------------------------

    def fail_next(self, kind: str, *, status: int = 500, times: int = 1) -> None:
        with self._lock:
            self._failures[kind].extend([status] * times)

    def of(self, kind: str) -> list[Post]:
        with self._lock:
            return [p for p in self.posts if p.kind == kind]

    def _kind(self, path: str) -> str:
        if path == WEBHOOK_PATH:
            return "webhook"
        if path.startswith(RESPONSE_PREFIX):
            return "response"
        if path == HOOK_PATH:
            return "hook"
        return "other"

    def _handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, str]:
        kind = self._kind(path)
        post = Post(kind=kind, path=path, headers=headers, body=body)
        with self._lock:
            failure = self._failures[kind].pop(0) if self._failures[kind] else None
            self.posts.append(post)
        if failure is not None:
            return failure, "server_error", "text/plain"
        if kind == "webhook":
            try:
                message = json.loads(body)
            except ValueError:
                return 400, "invalid_payload", "text/plain"
            if not message.get("text") and not message.get("blocks"):
                return 400, "no_text", "text/plain"
            return 200, "ok", "text/plain"
        if kind == "response":
            return 200, json.dumps({"ok": True}), "application/json"
        if kind == "hook":
            post.verified = verify_metaclaw_signature(self.webhook_secret, headers, body)
            if not post.verified:
                return 401, "bad signature", "text/plain"
            return 204, "", "text/plain"
        return 404, "no_service", "text/plain"


def _header(headers: dict[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def verify_metaclaw_signature(
    secret: str, headers: dict[str, str], body: bytes, *, tolerance: int = 300
) -> bool:
    """What a receiver of MetaClaw's webhook does with a delivery."""
    timestamp = _header(headers, "X-MetaClaw-Timestamp")
    signature = _header(headers, "X-MetaClaw-Signature")
    if not secret or not timestamp.isdigit() or not signature.startswith("sha256="):
        return False
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + expected.hexdigest(), signature)


def slack_signed_headers(
    secret: str, body: bytes | str, *, timestamp: int | None = None, retry_num: int | None = None
) -> dict[str, str]:
    """Django test-client headers for a request signed as Slack signs it: ``v0=`` + hex
    HMAC-SHA256(secret, ``v0:{timestamp}:{body}``)."""
    raw = body.decode() if isinstance(body, bytes) else body
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = (
        "v0=" + hmac.new(secret.encode(), f"v0:{ts}:{raw}".encode(), hashlib.sha256).hexdigest()
    )
    # Our signing must agree with Slack's own SDK, or the tests prove nothing.
    assert SignatureVerifier(secret).generate_signature(timestamp=ts, body=raw) == signature
    headers = {"HTTP_X_SLACK_REQUEST_TIMESTAMP": ts, "HTTP_X_SLACK_SIGNATURE": signature}
    if retry_num is not None:
        headers["HTTP_X_SLACK_RETRY_NUM"] = str(retry_num)
        headers["HTTP_X_SLACK_RETRY_REASON"] = "http_timeout"
    return headers
