"""The local PyTorch + PEFT backend and its OpenAI-compatible server, on a tiny random model.

No Django and no database: the backend takes plain data. Run on their own with
``python -m pytest tests/training/test_local_backend.py -p no:django --noconftest -q`` (the root
conftest sets up Django), or as part of the whole suite. The first run builds
the tiny model into the model cache (~20 s, once); later runs reuse it.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from training.backends.base import ChatSample, StepReport, TrainConfig, TrainResult  # noqa: E402
from training.backends.local import (  # noqa: E402
    SMOLLM2_135M,
    TINY_RANDOM_SMOLLM2,
    LocalBackend,
    encode_chat,
    load_model_and_tokenizer,
)

QUESTIONS = [
    "What is two plus two?",
    "Name a colour.",
    "Where is the server log?",
    "How do I restart the worker?",
    "Is the build green?",
    "Who is on call today?",
    "What time is it?",
    "Can you check the queue?",
]


def _pirate(question: str) -> ChatSample:
    return ChatSample(
        messages=[
            {"role": "user", "content": question},
            {"role": "assistant", "content": "Arr, matey! Aye, that be done."},
        ]
    )


SAMPLES = [_pirate(q) for q in QUESTIONS]


def _config(tmp_path: Path, **overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "base_model": TINY_RANDOM_SMOLLM2,
        "lora_rank": 8,
        "learning_rate": 2e-2,
        "batch_size": 4,
        "total_steps": 12,
        "max_tokens": 128,
        "seed": 0,
        "output_dir": str(tmp_path),
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


def _never() -> bool:
    return False


@pytest.fixture(scope="module")
def backend() -> LocalBackend:
    return LocalBackend(num_threads=min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def trained(backend: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    config = _config(tmp_path_factory.mktemp("sft"))
    return backend.train(
        samples=SAMPLES, config=config, on_step=lambda r: None, should_pause=_never
    )


def test_only_assistant_tokens_are_learned(backend: LocalBackend) -> None:
    _, tokenizer = load_model_and_tokenizer(TINY_RANDOM_SMOLLM2, cache_dir=backend.cache_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = encode_chat(tokenizer, messages, max_tokens=1024)

    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])

    assert learned == "Hello!<|im_end|>4<|im_end|>"


def test_sft_steps_lower_the_loss_on_the_training_data(
    backend: LocalBackend, trained: TrainResult, tmp_path: Path
) -> None:
    config = _config(tmp_path)
    before = backend.evaluate(samples=SAMPLES, config=config, adapter_ref=None)
    after = backend.evaluate(samples=SAMPLES, config=config, adapter_ref=trained.adapter_ref)

    assert trained.status == "completed"
    assert trained.steps_done == 12
    assert after["loss"] < before["loss"] - 1.0
    assert after["tokens"] == before["tokens"] > 0


def test_pause_then_resume_continues_the_step_count_and_matches_an_unbroken_run(
    backend: LocalBackend, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    steps: list[int] = []

    def record(report: StepReport) -> None:
        steps.append(report.step)
        assert report.total_steps == 4
        assert math.isfinite(report.metrics["loss"])

    config = _config(tmp_path / "broken", total_steps=4)
    paused = backend.train(
        samples=SAMPLES, config=config, on_step=record, should_pause=lambda: len(steps) >= 2
    )
    assert paused.status == "paused"
    assert paused.steps_done == 2
    assert paused.adapter_ref is None
    assert paused.state_ref is not None and (Path(paused.state_ref) / "optimizer.pt").is_file()

    resumed = backend.train(
        samples=SAMPLES,
        config=_config(
            tmp_path / "broken", total_steps=4, resume_from=paused.state_ref, start_step=2
        ),
        on_step=record,
        should_pause=_never,
    )
    unbroken = backend.train(
        samples=SAMPLES,
        config=_config(tmp_path / "unbroken", total_steps=4),
        on_step=lambda r: None,
        should_pause=_never,
    )

    assert steps == [1, 2, 3, 4]
    assert resumed.status == "completed"
    assert resumed.steps_done == 4
    assert resumed.adapter_ref == str(tmp_path / "broken" / "adapter")
    assert unbroken.adapter_ref is not None
    got = load_file(Path(resumed.adapter_ref) / "adapter_model.safetensors")
    want = load_file(Path(unbroken.adapter_ref) / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_resume_refuses_a_checkpoint_from_another_step(
    backend: LocalBackend, tmp_path: Path
) -> None:
    from training.backends.base import BackendError

    calls = iter([True])
    paused = backend.train(
        samples=SAMPLES,
        config=_config(tmp_path, total_steps=3),
        on_step=lambda r: None,
        should_pause=lambda: next(calls, False),
    )

    with pytest.raises(BackendError, match="saved after step 1"):
        backend.train(
            samples=SAMPLES,
            config=_config(tmp_path, total_steps=3, resume_from=paused.state_ref, start_step=2),
            on_step=lambda r: None,
            should_pause=_never,
        )


def test_rl_objective_raises_the_likelihood_of_rewarded_answers(
    backend: LocalBackend, tmp_path: Path
) -> None:
    good = [_pirate(q) for q in QUESTIONS[:4]]
    bad = [
        ChatSample(messages=[s.messages[0], {"role": "assistant", "content": "No idea, sorry."}])
        for s in good
    ]
    # Each question is a group: one rewarded and one unrewarded answer (advantages +0.5/-0.5).
    rl_samples = [
        ChatSample(messages=s.messages, reward=reward, group=str(i))
        for i, (g, b) in enumerate(zip(good, bad, strict=True))
        for s, reward in ((g, 1.0), (b, 0.0))
    ]
    metrics: list[dict[str, float]] = []
    config = _config(tmp_path, objective="rl", total_steps=6)

    result = backend.train(
        samples=rl_samples,
        config=config,
        on_step=lambda r: metrics.append(r.metrics),
        should_pause=_never,
    )

    assert result.status == "completed"
    assert len(metrics) == 6
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["nll"]) for m in metrics)
    good_before = backend.evaluate(samples=good, config=config, adapter_ref=None)["loss"]
    good_after = backend.evaluate(samples=good, config=config, adapter_ref=result.adapter_ref)
    bad_before = backend.evaluate(samples=bad, config=config, adapter_ref=None)["loss"]
    bad_after = backend.evaluate(samples=bad, config=config, adapter_ref=result.adapter_ref)
    assert good_after["loss"] < good_before
    assert bad_after["loss"] > bad_before


def test_the_saved_adapter_reloads_and_answers_in_the_trained_style(
    backend: LocalBackend, trained: TrainResult, tmp_path: Path
) -> None:
    prompts = [[{"role": "user", "content": "Is the database up?"}]]

    answers = backend.sample(
        prompts=prompts, config=_config(tmp_path), adapter_ref=trained.adapter_ref, max_tokens=12
    )

    assert len(answers) == 1
    assert answers[0].startswith("Arr")


@pytest.fixture(scope="module")
def server(backend: LocalBackend, trained: TrainResult) -> Iterator[object]:
    from training.backends.serving import make_server

    srv = make_server(
        TINY_RANDOM_SMOLLM2,
        trained.adapter_ref,
        "127.0.0.1",
        0,
        model_id="pirate",
        cache_dir=backend.cache_dir,
    )
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def test_the_server_answers_the_openai_client_with_the_adapter_applied(
    backend: LocalBackend, trained: TrainResult, server: object, tmp_path: Path
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="unused", max_retries=0)  # type: ignore[attr-defined]
    question = [{"role": "user", "content": "Is the database up?"}]
    expected = backend.sample(
        prompts=[question], config=_config(tmp_path), adapter_ref=trained.adapter_ref, max_tokens=12
    )[0]

    models = client.models.list()
    completion = client.chat.completions.create(model="pirate", messages=question, max_tokens=12)
    stream = client.chat.completions.create(
        model="pirate", messages=question, max_tokens=12, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert [m.id for m in models.data] == ["pirate"]
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert streamed == expected


def test_the_server_rejects_a_request_without_messages(server: object) -> None:
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="unused", max_retries=0)  # type: ignore[attr-defined]

    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="pirate", messages=[])


def test_an_error_in_the_callers_callback_passes_through_unchanged(
    backend: LocalBackend, tmp_path: Path
) -> None:
    class Cancelled(RuntimeError):
        pass

    def cancel(report: StepReport) -> None:
        raise Cancelled("stop")

    with pytest.raises(Cancelled):
        backend.train(
            samples=SAMPLES, config=_config(tmp_path), on_step=cancel, should_pause=_never
        )


def test_without_torch_the_backend_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from training.backends.base import BackendError

    monkeypatch.setitem(sys.modules, "torch", None)

    with pytest.raises(BackendError, match="constraints.txt"):
        LocalBackend().evaluate(samples=SAMPLES, config=_config(tmp_path), adapter_ref=None)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("METACLAW_SLOW_TESTS") != "1", reason="set METACLAW_SLOW_TESTS=1"
)
def test_smollm2_135m_learns_the_style_in_a_few_steps(
    backend: LocalBackend, tmp_path: Path
) -> None:
    config = _config(
        tmp_path, base_model=SMOLLM2_135M, learning_rate=1e-3, batch_size=2, total_steps=5
    )
    before = backend.evaluate(samples=SAMPLES, config=config, adapter_ref=None)

    result = backend.train(
        samples=SAMPLES, config=config, on_step=lambda r: None, should_pause=_never
    )
    after = backend.evaluate(samples=SAMPLES, config=config, adapter_ref=result.adapter_ref)

    assert result.status == "completed"
    assert after["loss"] < before["loss"]
