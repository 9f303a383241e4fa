"""A Tinker-like HTTP server on loopback, for tests that run the real ``tinker`` SDK.

It speaks the subset of Tinker's HTTP protocol that the SDK (0.38) uses for LoRA training,
checkpoints and sampling: every job answers ``{"request_id"}`` and its result is fetched
through ``retrieve_future``; the results of ``forward_backward`` and ``asample`` are
protobuf messages from the SDK's own ``tinker.proto.tinker_public_pb2``.

The "model" is a formula, not a network: the per-token loss of a training run decays with
the number of optimizer steps that followed a backward pass, so a training loop sees its
loss go down, a checkpoint carries its step count into a resumed run, and a sampler built
from saved weights scores and answers according to how far training got.

Failure injection, for the error paths of the client:

- ``fail_next("forward_backward", status=500, times=3)``: answer the next requests to an
  endpoint with an HTTP error (``x-should-retry: false``, so only the SDK's own outer retry
  loop retries them).
- ``fail_future_next("optim_step", error="boom", category="server")``: the next job of that
  endpoint is accepted, and its future resolves to ``{"error", "category"}``.
- ``try_again = 2``: every future answers ``{"type": "try_again"}`` that many times before
  its result.

Every request is recorded in ``requests`` (``RecordedRequest``); ``endpoints()`` lists their
paths in order.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

API_PREFIX = "/api/v1/"
PROTOBUF = "application/x-protobuf"

# The fake "model": per-token loss = FLOOR + (START - FLOOR) * DECAY ** steps, scaled a little
# by the target token so that different texts score differently.
LOSS_START = 2.0
LOSS_FLOOR = 0.2
LOSS_DECAY = 0.8


def token_nll(token: int, steps: int) -> float:
    """Negative log-likelihood the fake assigns to ``token`` after ``steps`` optimizer steps."""
    level = LOSS_FLOOR + (LOSS_START - LOSS_FLOOR) * LOSS_DECAY**steps
    return level * (0.75 + 0.5 * (token % 13) / 12)


@dataclass
class RecordedRequest:
    method: str
    path: str  # relative to /api/v1/, e.g. "forward_backward" or "samplers/abc"
    headers: dict[str, str]
    json: Any = None
    proto: pb.ForwardBackwardRequest | None = None


@dataclass
class _HttpFailure:
    status: int
    message: str


@dataclass
class _FutureFailure:
    error: str
    category: str


@dataclass
class _Future:
    result: dict[str, Any] | bytes | None = None
    failure: _FutureFailure | None = None
    try_again_left: int = 0


@dataclass
class _Model:
    model_id: str
    base_model: str
    lora_rank: int
    steps: int = 0
    pending_gradients: bool = False
    restored_optimizer: bool = False


@dataclass
class _Checkpoint:
    kind: str  # "weights" or "sampler_weights"
    base_model: str
    lora_rank: int
    steps: int


@dataclass
class _Sampler:
    base_model: str
    model_path: str | None
    steps: int


@dataclass
class _State:
    sessions: dict[str, str] = field(default_factory=dict)  # id -> status
    models: dict[str, _Model] = field(default_factory=dict)
    checkpoints: dict[str, _Checkpoint] = field(default_factory=dict)
    samplers: dict[str, _Sampler] = field(default_factory=dict)
    futures: dict[str, _Future] = field(default_factory=dict)


class FakeTinkerServer:
    """Start with ``FakeTinkerServer()`` (it listens at once, on an ephemeral port) or as a
    context manager; point the SDK at ``.url``; ``stop()`` when done."""

    def __init__(
        self,
        *,
        sample_text: str = "fake answer",
        tokenizer_id: str | None = None,
    ) -> None:
        # What the sampler answers, as UTF-8 bytes (one token per byte, which is what the
        # backend's offline byte tokenizer expects), followed by " [steps=N]".
        self.sample_text = sample_text
        # Reported by get_info; None lets the SDK guess the tokenizer from the model name.
        self.tokenizer_id = tokenizer_id
        self.try_again = 0
        self.requests: list[RecordedRequest] = []
        self._state = _State()
        self._lock = threading.Lock()
        self._http_failures: dict[str, deque[_HttpFailure]] = defaultdict(deque)
        self._future_failures: dict[str, deque[_FutureFailure]] = defaultdict(deque)

        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="fake-tinker", daemon=True
        )
        self._thread.start()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeTinkerServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- failure injection -----------------------------------------------------------------

    def fail_next(
        self, endpoint: str, *, status: int = 500, times: int = 1, message: str = "injected"
    ) -> None:
        with self._lock:
            for _ in range(times):
                self._http_failures[endpoint].append(_HttpFailure(status, message))

    def fail_future_next(
        self,
        endpoint: str,
        *,
        error: str = "injected failure",
        category: str = "server",
        times: int = 1,
    ) -> None:
        with self._lock:
            for _ in range(times):
                self._future_failures[endpoint].append(_FutureFailure(error, category))

    # -- inspection ------------------------------------------------------------------------

    def endpoints(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests]

    def requests_to(self, endpoint: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == endpoint]

    def model_steps(self, model_id: str) -> int:
        with self._lock:
            return self._state.models[model_id].steps

    def checkpoint_paths(self) -> list[str]:
        with self._lock:
            return list(self._state.checkpoints)

    # -- request handling (called from handler threads) ------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_http_failure(self, path: str) -> _HttpFailure | None:
        with self._lock:
            queue = self._http_failures.get(_endpoint_key(path))
            return queue.popleft() if queue else None

    def _new_future(self, endpoint: str, compute: Any) -> dict[str, Any]:
        """Run ``compute`` now (unless a failure is queued) and park its result under a new
        request id, the way the real service parks a queued job."""
        request_id = uuid.uuid4().hex
        with self._lock:
            queue = self._future_failures.get(endpoint)
            failure = queue.popleft() if queue else None
            future = _Future(failure=failure, try_again_left=self.try_again)
            if failure is None:
                future.result = compute()
            self._state.futures[request_id] = future
        return {"request_id": request_id}

    def handle(self, method: str, path: str, body: Any) -> tuple[int, str, bytes]:
        """Answer one request; returns (status, content type, body). Holds no lock on entry."""
        state = self._state
        if method == "GET":
            if path == "healthz":
                return _json(200, {"status": "ok"})
            if path.startswith("samplers/"):
                sampler_id = path.removeprefix("samplers/")
                with self._lock:
                    sampler = state.samplers.get(sampler_id)
                if sampler is None:
                    return _json(404, {"detail": f"unknown sampler {sampler_id}"})
                return _json(
                    200,
                    {
                        "sampler_id": sampler_id,
                        "base_model": sampler.base_model,
                        "model_path": sampler.model_path,
                    },
                )
            return _json(404, {"detail": f"no GET {path}"})

        if path == "client/config":
            # Plain httpx transport and uncompressed protobuf keep the fake small.
            return _json(
                200,
                {
                    "pjwt_auth_enabled": False,
                    "use_pyqwest_transport": False,
                    "proto_compress_fwdbwd": False,
                    "sample_use_retrieve_futures": False,
                    "sample_join_sampling_session": False,
                    "custom_loss_server_side": False,
                },
            )
        if path == "client/dynamic_config":
            return _json(200, {})
        if path == "create_session":
            session_id = f"session-{uuid.uuid4().hex[:12]}"
            with self._lock:
                state.sessions[session_id] = "active"
            return _json(200, {"type": "create_session", "session_id": session_id})
        if path == "session_heartbeat":
            return _json(200, {"type": "session_heartbeat"})
        if path.startswith("sessions/") and path.endswith("/finish"):
            session_id = path.split("/")[1]
            with self._lock:
                state.sessions[session_id] = "finished"
            return _json(200, {})
        if path == "telemetry":
            return _json(200, {"status": "accepted"})
        if path == "cancel_future":
            return _json(200, {})
        if path == "create_model":
            return self._create_model(body)
        if path == "get_info":
            return self._get_info(body)
        if path == "forward_backward":
            return self._forward_backward(body)
        if path == "optim_step":
            return self._optim_step(body)
        if path == "save_weights":
            return self._save(body, kind="weights", endpoint="save_weights")
        if path == "save_weights_for_sampler":
            return self._save(body, kind="sampler_weights", endpoint="save_weights_for_sampler")
        if path == "load_weights":
            return self._load_weights(body)
        if path == "create_sampling_session":
            return self._create_sampling_session(body)
        if path == "asample":
            return self._asample(body)
        if path == "retrieve_future":
            return self._retrieve_future(body)
        return _json(404, {"detail": f"no POST {path}"})

    def _model(self, model_id: str) -> _Model | None:
        with self._lock:
            return self._state.models.get(model_id)

    def _create_model(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        rank = int((body.get("lora_config") or {}).get("rank", 32))

        def compute() -> dict[str, Any]:
            self._state.models[model_id] = _Model(model_id, body["base_model"], rank)
            return {"type": "create_model", "model_id": model_id}

        return _json(200, self._new_future("create_model", compute))

    def _get_info(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        model = self._model(body["model_id"])
        if model is None:
            return _json(404, {"detail": f"unknown model {body['model_id']}"})
        return _json(
            200,
            {
                "type": "get_info",
                "model_id": model.model_id,
                "model_data": {
                    "arch": "fake",
                    "model_name": model.base_model,
                    "tokenizer_id": self.tokenizer_id,
                },
                "is_lora": True,
                "lora_rank": model.lora_rank,
                "model_name": model.base_model,
            },
        )

    def _forward_backward(self, request: pb.ForwardBackwardRequest) -> tuple[int, str, bytes]:
        model = self._model(request.model_id)
        if model is None:
            return _json(404, {"detail": f"unknown model {request.model_id}"})
        if request.loss_fn not in ("cross_entropy", "importance_sampling"):
            return _json(400, {"detail": f"loss_fn {request.loss_fn} not supported by the fake"})

        def compute() -> bytes:
            # Runs under the lock: the step count cannot move while the loss is computed.
            output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
            logprobs_per_datum: list[np.ndarray] = []
            loss_sum = 0.0
            for datum in request.data:
                inputs = {name: _tensor(t) for name, t in datum.loss_fn_inputs.items()}
                targets = inputs["target_tokens"].astype(np.int64)
                nll = np.array([token_nll(int(t), model.steps) for t in targets], np.float32)
                logprobs = -nll
                if request.loss_fn == "cross_entropy":
                    weights = inputs.get("weights", np.ones_like(nll))
                    loss_sum += float(np.sum(weights * nll))
                else:
                    ratio = np.exp(logprobs - inputs["logprobs"])
                    loss_sum += float(-np.sum(ratio * inputs["advantages"]))
                logprobs_per_datum.append(logprobs)
            offsets = np.cumsum([0] + [a.nbytes for a in logprobs_per_datum]).astype(np.int64)
            record = output.loss_fn_outputs.add(type_tag="ArrayRecord")
            record.num_datums = len(logprobs_per_datum)
            field_ = record.fields["logprobs"]
            field_.dtype = pb.DTYPE_FLOAT32
            field_.data = b"".join(a.tobytes() for a in logprobs_per_datum)
            field_.offsets = offsets.tobytes()
            output.metrics["loss:sum"] = loss_sum
            if not request.forward_only:
                model.pending_gradients = True
            return output.SerializeToString()

        return _json(200, self._new_future("forward_backward", compute))

    def _optim_step(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        model = self._model(body["model_id"])
        if model is None:
            return _json(404, {"detail": f"unknown model {body['model_id']}"})

        def compute() -> dict[str, Any]:
            # Like Adam on a zero gradient: a step without a backward pass changes nothing.
            if model.pending_gradients:
                model.steps += 1
                model.pending_gradients = False
            lr = float(
                (body.get("optim_params") or body.get("adam_params") or {}).get(
                    "learning_rate", 0.0
                )
            )
            return {"metrics": {"learning_rate:mean": lr}}

        return _json(200, self._new_future("optim_step", compute))

    def _save(self, body: dict[str, Any], *, kind: str, endpoint: str) -> tuple[int, str, bytes]:
        model = self._model(body["model_id"])
        if model is None:
            return _json(404, {"detail": f"unknown model {body['model_id']}"})
        name = body.get("path")

        def compute() -> dict[str, Any]:
            if name is None:
                # save_weights_and_get_sampling_client: an ephemeral sampler, no path.
                sampler_id = f"sampler-{uuid.uuid4().hex[:12]}"
                self._state.samplers[sampler_id] = _Sampler(model.base_model, None, model.steps)
                return {"type": endpoint, "sampling_session_id": sampler_id}
            path = f"tinker://{model.model_id}/{kind}/{name}"
            if path in self._state.checkpoints and not body.get("overwrite"):
                raise _JobError(f"checkpoint {path} already exists", "user")
            self._state.checkpoints[path] = _Checkpoint(
                kind, model.base_model, model.lora_rank, model.steps
            )
            return {"type": endpoint, "path": path}

        return _json(200, self._new_future(endpoint, _catching(compute)))

    def _load_weights(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        path = body["path"]
        session_id = body.get("session_id")
        if session_id is not None:
            model_id = f"{session_id}:train:{body['model_seq_id']}"
        else:
            model_id = body["model_id"]

        def compute() -> dict[str, Any]:
            checkpoint = self._state.checkpoints.get(path)
            if checkpoint is None:
                raise _JobError(f"no checkpoint at {path}", "user")
            if checkpoint.kind != "weights":
                raise _JobError(f"{path} holds sampler weights, not training state", "user")
            self._state.models[model_id] = _Model(
                model_id,
                body.get("base_model") or checkpoint.base_model,
                checkpoint.lora_rank,
                steps=checkpoint.steps,
                restored_optimizer=bool(body.get("optimizer")),
            )
            return {"type": "load_weights", "path": path, "model_id": model_id}

        return _json(200, self._new_future("load_weights", _catching(compute)))

    def _create_sampling_session(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        model_path = body.get("model_path")
        with self._lock:
            if model_path:
                checkpoint = self._state.checkpoints.get(model_path)
                if checkpoint is None:
                    return _json(404, {"detail": f"no checkpoint at {model_path}"})
                sampler = _Sampler(checkpoint.base_model, model_path, checkpoint.steps)
            else:
                sampler = _Sampler(body["base_model"], None, 0)
            sampler_id = f"sampler-{uuid.uuid4().hex[:12]}"
            self._state.samplers[sampler_id] = sampler
        return _json(200, {"type": "create_sampling_session", "sampling_session_id": sampler_id})

    def _asample(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        with self._lock:
            sampler = self._state.samplers.get(body["sampling_session_id"])
        if sampler is None:
            return _json(404, {"detail": f"unknown sampler {body['sampling_session_id']}"})
        prompt = [t for chunk in body["prompt"]["chunks"] for t in chunk.get("tokens", [])]
        params = body.get("sampling_params") or {}
        max_tokens = params.get("max_tokens") or 16
        num_samples = int(body.get("num_samples", 1))

        def compute() -> bytes:
            answer = f"{self.sample_text} [steps={sampler.steps}]".encode()
            tokens = list(answer[:max_tokens])
            stop_reason = (
                pb.STOP_REASON_STOP if len(answer) <= max_tokens else pb.STOP_REASON_LENGTH
            )
            response = pb.SampleResponse()
            for _ in range(num_samples):
                response.sequences.add(
                    stop_reason=stop_reason,
                    tokens=np.asarray(tokens, np.int32).tobytes(),
                    logprobs=np.asarray(
                        [-token_nll(t, sampler.steps) for t in tokens], np.float32
                    ).tobytes(),
                )
            if body.get("prompt_logprobs"):
                scores = [math.nan] + [-token_nll(t, sampler.steps) for t in prompt[1:]]
                response.prompt_logprobs = np.asarray(scores, np.float32).tobytes()
            return response.SerializeToString()

        answer = self._new_future("asample", compute)
        answer["sample_sequence_ids"] = [f"{answer['request_id']}-{i}" for i in range(num_samples)]
        return _json(200, answer)

    def _retrieve_future(self, body: dict[str, Any]) -> tuple[int, str, bytes]:
        with self._lock:
            future = self._state.futures.get(body["request_id"])
            if future is None:
                return _json(404, {"detail": f"unknown request {body['request_id']}"})
            if future.try_again_left > 0:
                future.try_again_left -= 1
                return _json(
                    200,
                    {
                        "type": "try_again",
                        "request_id": body["request_id"],
                        "queue_state": "active",
                    },
                )
        if future.failure is not None:
            return _json(200, {"error": future.failure.error, "category": future.failure.category})
        if isinstance(future.result, bytes):
            return 200, PROTOBUF, future.result
        return _json(200, future.result)


class _JobError(Exception):
    def __init__(self, error: str, category: str) -> None:
        super().__init__(error)
        self.error = error
        self.category = category


def _catching(compute: Any) -> Any:
    """Turn a ``_JobError`` raised while computing a job into the job's failed result."""

    def run() -> dict[str, Any]:
        try:
            return compute()
        except _JobError as exc:
            return {"error": exc.error, "category": exc.category}

    return run


def _endpoint_key(path: str) -> str:
    return "samplers" if path.startswith("samplers/") else path


def _json(status: int, payload: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode()


def _tensor(message: pb.Tensor) -> np.ndarray:
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}[
        message.dtype
    ]
    if message.HasField("sparse_csr"):
        raise NotImplementedError("the fake takes dense tensors only")
    return np.frombuffer(message.dense, dtype=dtype)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the SDK's pooled connections alive between requests.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, each answer waits for a
    # delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    fake: FakeTinkerServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        url_path = self.path.split("?", 1)[0]
        if not url_path.startswith(API_PREFIX):
            self._send(404, "application/json", b'{"detail": "not found"}')
            return
        path = url_path.removeprefix(API_PREFIX)
        recorded = RecordedRequest(method, path, {k.lower(): v for k, v in self.headers.items()})
        body: Any = None
        if PROTOBUF in (self.headers.get("content-type") or ""):
            body = pb.ForwardBackwardRequest()
            body.ParseFromString(raw)
            recorded.proto = body
        elif raw:
            body = json.loads(raw)
            recorded.json = body
        self.fake._record(recorded)

        if not (self.headers.get("x-api-key") or "").startswith("tml-"):
            self._send(*_json(401, {"detail": "missing or malformed X-API-Key"}))
            return
        failure = self.fake._take_http_failure(path)
        if failure is not None:
            status, content_type, payload = _json(failure.status, {"detail": failure.message})
            # Stops the Stainless client's inner retries; the SDK's outer loop still retries
            # retryable statuses on its own.
            self._send(status, content_type, payload, {"x-should-retry": "false"})
            return
        self._send(*self.fake.handle(method, path, body))

    def _send(
        self,
        status: int,
        content_type: str,
        payload: bytes,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        # Test output stays readable; the requests are in `fake.requests`.
        pass
