"""TinkerBackend driven through the real ``tinker`` SDK against our loopback Tinker fake.

Plain pytest, no database: ``python -m pytest tests/training/test_tinker_backend.py -p no:django``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.fakes.tinker_server import FakeTinkerServer
from training.backends.base import BackendError, ChatSample, StepReport, TrainConfig
from training.backends.tinker import ByteChatTokenizer, HuggingFaceChatTokenizer, TinkerBackend

# The SDK retries for minutes on its own; nothing here may wait that long.
pytestmark = pytest.mark.timeout(30)

API_KEY = "tml-test-key"

SAMPLES = [
    ChatSample(
        messages=[
            {"role": "system", "content": "You are a terse SRE."},
            {"role": "user", "content": "Disk full on db-1?"},
            {"role": "assistant", "content": "Rotate the WAL archive, then grow the volume."},
        ]
    ),
    ChatSample(
        messages=[
            {"role": "user", "content": "Pod crash-looping?"},
            {"role": "assistant", "content": "Read the previous container's logs first."},
        ]
    ),
    ChatSample(
        messages=[
            {"role": "user", "content": "TLS expiry alert?"},
            {"role": "assistant", "content": "Renew with the ACME job and reload the proxy."},
        ]
    ),
]


@pytest.fixture
def fake() -> Iterator[FakeTinkerServer]:
    with FakeTinkerServer() as server:
        yield server


def make_backend(fake: FakeTinkerServer, *, timeout: float = 10.0) -> TinkerBackend:
    return TinkerBackend(base_url=fake.url, api_key=API_KEY, timeout=timeout, tokenizer="byte")


def make_config(**overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "base_model": "fake/tiny-model",
        "lora_rank": 8,
        "learning_rate": 1e-4,
        "batch_size": 2,
        "total_steps": 5,
    }
    values.update(overrides)
    return TrainConfig(**values)


def run_train(
    backend: TinkerBackend,
    config: TrainConfig,
    samples: list[ChatSample] = SAMPLES,
    pause_after: int | None = None,
) -> tuple[Any, list[StepReport]]:
    reports: list[StepReport] = []

    def should_pause() -> bool:
        return pause_after is not None and len(reports) >= pause_after

    result = backend.train(
        samples=samples, config=config, on_step=reports.append, should_pause=should_pause
    )
    return result, reports


def training_error(backend: TinkerBackend, config: TrainConfig | None = None) -> BackendError:
    """The ``BackendError`` that training with ``backend`` raises (on ``make_config()`` unless
    ``config`` is given)."""
    with pytest.raises(BackendError) as caught:
        run_train(backend, config if config is not None else make_config())
    return caught.value


def tensor(message: Any) -> np.ndarray:
    dtype = np.int64 if message.dtype == 2 else np.float32
    return np.frombuffer(message.dense, dtype=dtype)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- training ---------------------------------------------------------------------------------


def test_sft_run_reports_a_decreasing_loss_and_returns_a_sampler_path(fake):
    result, reports = run_train(make_backend(fake), make_config())

    assert [r.step for r in reports] == [1, 2, 3, 4, 5]
    assert all(r.total_steps == 5 for r in reports)
    losses = [r.metrics["loss"] for r in reports]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False))
    assert result.status == "completed"
    assert result.steps_done == 5
    assert result.state_ref is None
    assert result.adapter_ref.startswith("tinker://")
    assert "/sampler_weights/" in result.adapter_ref
    assert result.metrics == reports[-1].metrics
    assert len(fake.requests_to("forward_backward")) == 5
    assert len(fake.requests_to("optim_step")) == 5
    # The session is finished when the call returns, not left to expire.
    assert any(p.startswith("sessions/") and p.endswith("/finish") for p in fake.endpoints())


def test_sft_datums_weigh_only_the_assistant_tokens_and_are_shifted_by_one(fake):
    run_train(make_backend(fake), make_config(total_steps=1, batch_size=3))

    [request] = fake.requests_to("forward_backward")
    assert request.proto.loss_fn == "cross_entropy"
    learned_texts = set()
    for datum in request.proto.data:
        inputs = np.frombuffer(datum.model_input[0].encoded_text.tokens, dtype=np.int32)
        targets = tensor(datum.loss_fn_inputs["target_tokens"])
        weights = tensor(datum.loss_fn_inputs["weights"])
        assert len(inputs) == len(targets) == len(weights)
        assert list(inputs[1:]) == list(targets[:-1])
        learned_texts.add(bytes(int(t) for t, w in zip(targets, weights, strict=True) if w))
    assert learned_texts == {f"{s.messages[-1]['content']}\n".encode() for s in SAMPLES}


def test_pause_saves_resumable_state_and_resume_keeps_counting_steps(fake):
    backend = make_backend(fake)
    paused, before = run_train(backend, make_config(), pause_after=2)

    assert paused.status == "paused"
    assert paused.steps_done == 2
    assert paused.adapter_ref is None
    assert paused.state_ref.startswith("tinker://")
    assert "/weights/" in paused.state_ref

    resumed, after = run_train(
        backend, make_config(resume_from=paused.state_ref, start_step=paused.steps_done)
    )

    assert [r.step for r in after] == [3, 4, 5]
    assert resumed.status == "completed"
    assert resumed.steps_done == 5
    # The resumed run starts from the trained weights, not from scratch.
    assert after[0].metrics["loss"] < before[-1].metrics["loss"]
    [load] = fake.requests_to("load_weights")
    assert load.json["path"] == paused.state_ref
    assert load.json["optimizer"] is True


def test_pause_requested_before_the_first_step_saves_state_without_training(fake):
    result, reports = run_train(make_backend(fake), make_config(), pause_after=0)

    assert result.status == "paused"
    assert result.steps_done == 0
    assert reports == []
    assert fake.requests_to("forward_backward") == []


def test_rl_sends_group_baselined_advantages_on_assistant_tokens(fake):
    samples = [
        ChatSample(messages=SAMPLES[0].messages, reward=1.0, group="a"),
        ChatSample(messages=SAMPLES[1].messages, reward=0.0, group="a"),
        ChatSample(messages=SAMPLES[2].messages, reward=0.5, group="b"),
    ]
    _, reports = run_train(
        make_backend(fake), make_config(objective="rl", total_steps=1, batch_size=3), samples
    )

    [request] = fake.requests_to("forward_backward")
    assert request.proto.loss_fn == "importance_sampling"
    advantages = set()
    for datum in request.proto.data:
        values = tensor(datum.loss_fn_inputs["advantages"])
        assert not tensor(datum.loss_fn_inputs["logprobs"]).any()  # no sampler logprobs
        advantages.add(round(float(values[values != 0][0]), 3) if values.any() else 0.0)
    assert advantages == {0.5, -0.5, 0.0}
    assert reports[0].metrics["reward_mean"] == pytest.approx(0.5)


def test_rl_refuses_samples_without_a_reward(fake):
    with pytest.raises(BackendError, match="reward"):
        run_train(make_backend(fake), make_config(objective="rl"), SAMPLES)


# -- evaluation and sampling ------------------------------------------------------------------


def test_evaluate_scores_the_trained_adapter_below_the_base_model(fake):
    backend = make_backend(fake)
    result, _ = run_train(backend, make_config())

    base = backend.evaluate(samples=SAMPLES, config=make_config(), adapter_ref=None)
    tuned = backend.evaluate(samples=SAMPLES, config=make_config(), adapter_ref=result.adapter_ref)

    assert tuned["loss"] < base["loss"]
    assert base["tokens"] == tuned["tokens"] > 0


def test_sample_answers_greedily_with_and_without_the_adapter(fake):
    backend = make_backend(fake)
    result, _ = run_train(backend, make_config())
    prompts = [[{"role": "user", "content": "Disk full?"}], [{"role": "user", "content": "Hi"}]]

    tuned = backend.sample(
        prompts=prompts, config=make_config(), adapter_ref=result.adapter_ref, max_tokens=64
    )
    base = backend.sample(prompts=prompts[:1], config=make_config(), adapter_ref=None)

    assert tuned == ["fake answer [steps=5]", "fake answer [steps=5]"]
    assert base == ["fake answer [steps=0]"]
    # The prompts are sampled concurrently: their requests may arrive in either order.
    requests = [r.json for r in fake.requests_to("asample")[:2]]
    assert all(r["sampling_params"]["top_k"] == 1 for r in requests)
    assert all(r["sampling_params"]["max_tokens"] == 64 for r in requests)
    prompts_sent = {bytes(r["prompt"]["chunks"][0]["tokens"]) for r in requests}
    assert prompts_sent == {
        b"<|user|>\nDisk full?\n<|assistant|>\n",
        b"<|user|>\nHi\n<|assistant|>\n",
    }


# -- failures ---------------------------------------------------------------------------------


def test_a_transient_500_is_retried_by_the_sdk_and_the_run_completes(fake):
    fake.fail_next("forward_backward", status=500)

    result, reports = run_train(make_backend(fake), make_config(total_steps=2))

    assert result.status == "completed"
    assert len(reports) == 2


def test_try_again_answers_are_waited_out(fake):
    fake.try_again = 2

    result, _ = run_train(make_backend(fake), make_config(total_steps=1))

    assert result.status == "completed"
    assert len(fake.requests_to("retrieve_future")) >= 3 * 4  # create, fwd/bwd, optim, save


def test_a_persistent_500_becomes_a_retryable_error_within_the_timeout(fake):
    fake.fail_next("forward_backward", status=500, times=1000)
    started = time.monotonic()

    error = training_error(make_backend(fake, timeout=1.5))

    assert error.retryable
    assert "training step 1" in str(error)
    assert time.monotonic() - started < 6


def test_a_client_error_status_is_not_retryable(fake):
    fake.fail_next("create_model", status=403, message="project is read-only")

    error = training_error(make_backend(fake))

    assert not error.retryable
    assert "403" in str(error)


def test_a_failed_future_in_the_users_fault_is_not_retryable(fake):
    fake.fail_future_next("forward_backward", error="target_tokens too long", category="user")

    error = training_error(make_backend(fake))

    assert not error.retryable
    assert "target_tokens too long" in str(error)


def test_a_failed_future_in_the_services_fault_is_retryable(fake):
    fake.fail_future_next("optim_step", error="trainer lost", category="server")

    error = training_error(make_backend(fake))

    assert error.retryable
    assert "trainer lost" in str(error)


def test_resuming_from_sampler_weights_is_refused(fake):
    backend = make_backend(fake)
    result, _ = run_train(backend, make_config(total_steps=1))

    error = training_error(backend, make_config(resume_from=result.adapter_ref, start_step=1))

    assert not error.retryable
    assert "sampler weights" in str(error)


def test_a_refused_connection_becomes_a_retryable_error_quickly():
    backend = TinkerBackend(
        base_url=f"http://127.0.0.1:{closed_port()}",
        api_key=API_KEY,
        timeout=1.0,
        tokenizer="byte",
    )
    started = time.monotonic()

    error = training_error(backend)

    assert error.retryable
    assert time.monotonic() - started < 5


# -- tokenisation -----------------------------------------------------------------------------


class ChatMLStub:
    """Just enough of a ``transformers`` tokenizer: a ChatML template over byte tokens."""

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert tokenize is False
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(text.encode())

    def decode(self, tokens: list[int], skip_special_tokens: bool) -> str:
        return bytes(tokens).decode()


def test_model_tokenizer_weighs_each_assistant_turn_without_its_header():
    tokenizer = HuggingFaceChatTokenizer(ChatMLStub())
    messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]

    tokens, weights = tokenizer.encode_conversation(messages)

    learned = bytes(t for t, w in zip(tokens, weights, strict=True) if w)
    assert learned == b"yes<|im_end|>\nno<|im_end|>\n"
    assert bytes(tokenizer.encode_prompt(messages[:1])).endswith(b"<|im_start|>assistant\n")


def test_byte_tokenizer_round_trips_a_completion_up_to_the_next_turn():
    tokenizer = ByteChatTokenizer()

    assert tokenizer.decode_completion(list(b"Done.\n<|user|>\nmore")) == "Done."
    tokens, weights = tokenizer.encode_conversation(
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    )
    assert bytes(t for t, w in zip(tokens, weights, strict=True) if w) == b'[{"id": "1"}]\n'
