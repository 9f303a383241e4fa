"""Serve a base model with a LoRA adapter over an OpenAI-compatible HTTP API.

``POST /v1/chat/completions`` (plain JSON, or server-sent events with ``"stream": true``) and
``GET /v1/models``, enough for the official ``openai`` client and for anything that speaks to
an OpenAI-compatible endpoint. It runs the model through transformers + PEFT, one request at a
time: on a CPU a second concurrent generation only halves the speed of both. One server serves
one model: it answers a request whatever model it names, and reports its own ``model_id`` in
``/v1/models`` and in every answer. Without ``--adapter`` it serves the base model alone.

    python -m training.backends.serving --base-model smollm2-135m \
        --adapter var/runs/7/adapter --port 8100
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from training.backends.local import (
    default_num_threads,
    generate,
    load_model_and_tokenizer,
)

logger = logging.getLogger(__name__)

MAX_TOKENS_CAP = 2048


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, model: Any, tokenizer: Any, model_id: str):
        super().__init__(address, _Handler)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.generate_lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class _RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    # HTTP/1.0 closes the connection after each response, so a stream needs no chunked
    # encoding: it ends when the socket does.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._json(
                HTTPStatus.OK,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.server.model_id,
                            "object": "model",
                            "created": 0,
                            "owned_by": "metaclaw",
                        }
                    ],
                },
            )
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route for GET {self.path}")

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(HTTPStatus.NOT_FOUND, f"no route for POST {self.path}")
            return
        try:
            request = self._read_request()
            if request.get("stream"):
                self._stream(request)
            else:
                self._complete(request)
        except _RequestError as exc:
            self._error(exc.status, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away")
        except Exception as exc:
            logger.exception("chat completion failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {exc}")

    # -- request parsing --

    def _read_request(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as exc:
            raise _RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list")
        body["messages"] = [_plain_message(m) for m in messages]
        if int(body.get("n") or 1) != 1:
            raise _RequestError(HTTPStatus.BAD_REQUEST, "only n=1 is supported")
        return body

    def _options(self, request: dict[str, Any]) -> dict[str, Any]:
        limit = request.get("max_completion_tokens") or request.get("max_tokens") or 256
        return {
            "max_new_tokens": max(1, min(int(limit), MAX_TOKENS_CAP)),
            "temperature": float(request.get("temperature") or 0.0),
            "top_p": float(request.get("top_p") or 1.0),
        }

    # -- responses --

    def _complete(self, request: dict[str, Any]) -> None:
        with self.server.generate_lock:
            text, prompt_tokens, completion_tokens, finish = generate(
                self.server.model,
                self.server.tokenizer,
                request["messages"],
                **self._options(request),
            )
        self._json(
            HTTPStatus.OK,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.server.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _stream(self, request: dict[str, Any]) -> None:
        from transformers import TextIteratorStreamer

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> None:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.server.model_id,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

        with self.server.generate_lock:
            streamer = TextIteratorStreamer(
                self.server.tokenizer, skip_prompt=True, skip_special_tokens=True
            )
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["result"] = generate(
                        self.server.model,
                        self.server.tokenizer,
                        request["messages"],
                        streamer=streamer,
                        **self._options(request),
                    )
                except Exception as exc:  # reported after the stream ends
                    logger.exception("generation failed")
                    outcome["error"] = exc
                    streamer.end()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                chunk({"role": "assistant", "content": ""}, None)
                started = False
                for piece in streamer:
                    if not started:
                        # generate() strips leading whitespace from the full answer; match it.
                        piece = piece.lstrip()
                        started = bool(piece)
                    if piece:
                        chunk({"content": piece}, None)
            finally:
                # Hold the lock until the model is free, even when the client left early.
                worker.join()
        finish = outcome["result"][3] if "result" in outcome else "stop"
        chunk({}, finish)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        self._json(status, {"error": {"message": message, "type": kind, "code": None}})


def _plain_message(message: Any) -> dict[str, Any]:
    """Reduce an OpenAI message to role + text, joining content parts the template can't take."""
    if not isinstance(message, dict) or "role" not in message:
        raise _RequestError(HTTPStatus.BAD_REQUEST, "each message needs a role")
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": str(content)}


def make_server(
    base_model: str,
    adapter_dir: str | Path | None,
    host: str = "127.0.0.1",
    port: int = 8100,
    *,
    model_id: str | None = None,
    cache_dir: str | Path | None = None,
) -> ModelServer:
    """Load the model and bind the server (port 0 picks a free port); the caller runs it."""
    import torch

    torch.set_num_threads(default_num_threads())
    model, tokenizer = load_model_and_tokenizer(
        base_model, adapter_dir=adapter_dir, cache_dir=cache_dir
    )
    model.eval()
    if model_id is None:
        # The rule of skills.runtime.upstream.adapter_model_name, which the proxy sends
        # (serve_adapter passes that name; tests/training/test_serving_names.py pins both).
        model_id = Path(adapter_dir).name if adapter_dir else base_model
        if adapter_dir and model_id == "adapter":
            # <output_dir>/adapter: the run folder names it better.
            model_id = Path(adapter_dir).parent.name or model_id
    return ModelServer((host, port), model=model, tokenizer=tokenizer, model_id=model_id)


def serve(server: ModelServer) -> None:
    """Serve until interrupted, then close the server."""
    logger.info("serving %s at %s", server.model_id, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-model", required=True, help="smollm2-135m, tiny-random-smollm2 or a folder"
    )
    parser.add_argument(
        "--adapter", default=None, help="LoRA adapter folder (omit for the base model)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model-id", default=None, help="the name /v1/models reports")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(
        args.base_model,
        args.adapter,
        args.host,
        args.port,
        model_id=args.model_id,
        cache_dir=args.cache_dir,
    )
    serve(server)


if __name__ == "__main__":
    main()
