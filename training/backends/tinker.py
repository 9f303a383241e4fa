"""The Tinker training backend: LoRA fine-tuning on Thinking Machines' hosted service.

One backend, one module (past 500 lines on purpose): the session, tokenization, both
objectives, checkpoints and sampling all go through the same bounded-wait wrapper around the SDK
and read best top to bottom.

Only this module imports the ``tinker`` SDK. Each public call opens its own
``ServiceClient`` session and finishes it before returning, so a backend object holds no
connection and may be built in one process and used in a forked Celery worker.

Waiting is always bounded. The SDK retries connection errors and 5xx answers on its own
for up to five minutes per request (and its session start-up waits without a limit), with
no setting to shorten that; so every blocking step here runs under the backend's
``timeout``. A step that does not finish in time becomes a retryable ``BackendError``, and
its SDK future is cancelled so the SDK stops retrying it in the background.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

import tinker
from tinker import types

from training.backends.base import (
    BackendError,
    ChatSample,
    StepReport,
    TrainConfig,
    TrainResult,
    group_advantages,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

Message = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


class ChatTokenizer(Protocol):
    """Turns conversations into the model's tokens, and sampled tokens back into text."""

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[float]]:
        """Tokens of the whole rendered conversation, and per token a weight: 1.0 on tokens
        written by the assistant (the ones to learn), 0.0 elsewhere."""
        ...

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Tokens of the conversation followed by the header of an assistant turn."""
        ...

    def decode_completion(self, tokens: Sequence[int]) -> str:
        """The text of a sampled assistant turn, without its end-of-turn marker."""
        ...

    @property
    def stop(self) -> list[str] | None:
        """Stop sequences for sampling; None keeps the model's own end-of-sequence tokens."""
        ...


def message_text(message: Message) -> str:
    """The text of an OpenAI-format message: string content, text parts of list content, and
    tool calls as JSON (so a turn that only calls a tool still has tokens to learn)."""
    content = message.get("content")
    if isinstance(content, list):
        text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    else:
        text = content or ""
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"], ensure_ascii=False, sort_keys=True)
    return text


class ByteChatTokenizer:
    """A deterministic byte-level tokenizer, for offline tests only.

    It renders each message as ``<|role|>\\ncontent\\n`` and uses the UTF-8 bytes as token
    ids (0-255). Real Tinker models need their own tokenizer and chat template (see
    ``HuggingFaceChatTokenizer``); this one exists because the real tokenizer comes from the
    Hugging Face hub, which tests cannot reach, and the loopback fake server accepts any ids.
    """

    stop: list[str] | None = ["\n<|"]

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[float]]:
        tokens: list[int] = []
        weights: list[float] = []
        for message in messages:
            header = f"<|{message.get('role', 'user')}|>\n".encode()
            body = f"{message_text(message)}\n".encode()
            learn = 1.0 if message.get("role") == "assistant" else 0.0
            tokens += [*header, *body]
            # The trailing newline ends the turn, so it is learned with the content.
            weights += [0.0] * len(header) + [learn] * len(body)
        return tokens, weights

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        tokens, _ = self.encode_conversation(messages)
        return tokens + list(b"<|assistant|>\n")

    def decode_completion(self, tokens: Sequence[int]) -> str:
        text = bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")
        for stop in self.stop or []:
            text = text.split(stop, 1)[0]
        return text.removesuffix("\n")


class HuggingFaceChatTokenizer:
    """The model's real tokenizer (a ``transformers`` tokenizer, as Tinker's
    ``get_tokenizer()`` returns it) with its chat template.

    Assistant tokens are found by rendering growing prefixes of the conversation: a turn
    spans from the end of the prompt that precedes it (with the assistant header) to the end
    of the rendering that includes it. Templates that rewrite earlier turns (e.g. dropping
    past reasoning) make these spans approximate, never misaligned with the tokens.
    """

    stop: list[str] | None = None

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def _render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
        plain = [{"role": m.get("role", "user"), "content": message_text(m)} for m in messages]
        text = self._tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[float]]:
        tokens = self._render(messages, add_generation_prompt=False)
        weights = [0.0] * len(tokens)
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = len(self._render(messages[:index], add_generation_prompt=True)) if index else 0
            end = len(self._render(messages[: index + 1], add_generation_prompt=False))
            for position in range(start, min(end, len(tokens))):
                weights[position] = 1.0
        return tokens, weights

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._render(messages, add_generation_prompt=True)

    def decode_completion(self, tokens: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(tokens), skip_special_tokens=True)).strip()


TokenizerChoice = Literal["model", "byte"]


# --------------------------------------------------------------------------------------------
# Errors and bounded waiting
# --------------------------------------------------------------------------------------------


def _is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def _as_backend_error(what: str, exc: BaseException, timeout: float) -> BackendError:
    """Translate an SDK failure into a ``BackendError`` that says what failed and whether
    trying again later may help."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, TimeoutError):
        return BackendError(f"Tinker: {what} got no result within {timeout:g} s", retryable=True)
    if isinstance(exc, tinker.RequestFailedError):
        user_fault = exc.category == types.RequestErrorCategory.User
        return BackendError(
            f"Tinker: {what} failed ({exc.category.value} error): {exc.message}",
            retryable=not user_fault,
        )
    # The SDK wraps some HTTP failures (e.g. a 404 while fetching a result) in ValueError.
    status_error = exc if isinstance(exc, tinker.APIStatusError) else exc.__cause__
    if isinstance(status_error, tinker.APIStatusError):
        return BackendError(
            f"Tinker: {what} failed with HTTP {status_error.status_code}: {status_error.message}",
            retryable=_is_retryable_status(status_error.status_code),
        )
    if isinstance(exc, tinker.APIConnectionError):
        return BackendError(f"Tinker: {what} could not reach the service: {exc}", retryable=True)
    if type(exc).__name__ == "RetryableException":  # a result the service lost; resubmit
        return BackendError(f"Tinker: {what} failed: {exc}", retryable=True)
    return BackendError(f"Tinker: {what} failed: {type(exc).__name__}: {exc}")


def _run_bounded(fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` on a daemon thread and wait at most ``timeout`` seconds for it.

    For SDK calls that block without a limit of their own (session start-up, tokenizer
    download). A thread left behind by a timeout is a daemon, so it never holds up exit.
    """
    box: Future[T] = Future()

    def target() -> None:
        try:
            box.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box.set_exception(exc)

    threading.Thread(target=target, name="tinker-backend-call", daemon=True).start()
    return box.result(timeout)


# --------------------------------------------------------------------------------------------
# Datums
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    datum: types.Datum
    learned_tokens: int  # target positions that carry weight (SFT) or an advantage (RL)
    reward: float = 0.0


def _sft_datum(tokens: list[int], weights: list[float]) -> types.Datum:
    # Position i predicts token i + 1, so inputs drop the last token and targets the first.
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def _sampler_logprobs(messages: Sequence[Message], weights: list[float]) -> list[float] | None:
    """Per-token sampling logprobs aligned with ``weights``, when every assistant turn carries
    them (``message["logprobs"]``: one float per token of the turn, as a Tinker sampler
    returned them); otherwise None."""
    turns = [m for m in messages if m.get("role") == "assistant"]
    if not turns or not all(isinstance(m.get("logprobs"), list) for m in turns):
        return None
    flat = [float(lp) for m in turns for lp in m["logprobs"]]
    if len(flat) != sum(1 for w in weights if w > 0):
        return None
    out: list[float] = []
    source = iter(flat)
    for weight in weights:
        out.append(next(source) if weight > 0 else 0.0)
    return out


def _group_advantages(samples: Sequence[ChatSample]) -> list[float]:
    return group_advantages(samples, missing_reward="Tinker: every RL sample needs a reward")


def _rl_datum(
    tokens: list[int], weights: list[float], advantage: float, logprobs: list[float] | None
) -> types.Datum:
    """An ``importance_sampling`` datum: the advantage sits on the assistant's tokens.

    The loss is ``-sum(exp(logp_now - logp_sampled) * advantage)``. ``logp_sampled`` should
    be the logprobs the sampler reported when it produced these tokens; our conversations
    mostly come from production agents, not from a Tinker sampler, so when a turn carries no
    ``logprobs`` they are zeros. With zeros the ratio is the token's current probability and
    the update is a policy gradient weighted by that probability: it still raises tokens with
    a positive advantage and lowers the others, only less for tokens the model finds unlikely.
    """
    old = logprobs if logprobs is not None else [0.0] * len(tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": old[1:],
            "advantages": [advantage * w for w in weights[1:]],
        },
    )


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class TinkerBackend:
    """``TrainingBackend`` on Tinker.

    ``base_url`` and ``api_key`` default, like the SDK, to ``TINKER_BASE_URL`` and
    ``TINKER_API_KEY``. ``timeout`` bounds each wait on the service (session start, each
    training step, each checkpoint, each sample). ``tokenizer`` is ``"model"`` in production
    (the base model's real tokenizer, via the SDK's ``get_tokenizer()``, which downloads it
    from the Hugging Face hub once per process), ``"byte"`` for offline tests against the
    loopback fake, or any ``ChatTokenizer``. There is deliberately no silent fallback from
    the real tokenizer to the byte one: training a real model on byte ids would "succeed"
    and produce garbage.
    """

    name = "tinker"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        tokenizer: TokenizerChoice | ChatTokenizer = "model",
    ) -> None:
        self._base_url = base_url
        self._api_key = api_key
        self._timeout = timeout
        self._tokenizer_choice = tokenizer
        self._tokenizers: dict[str, ChatTokenizer] = {}
        self._tokenizers_lock = threading.Lock()

    # -- SDK plumbing ------------------------------------------------------------------------

    def _wait(self, future: Any, deadline: float) -> Any:
        """The result of an SDK future, waiting no later than ``deadline``."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            # Otherwise the SDK keeps retrying this request in the background.
            future.future().cancel()
            raise

    def _call(self, what: str, submit: Callable[[], Any]) -> Any:
        """Submit one SDK request and wait for its result, all within ``timeout``."""
        deadline = time.monotonic() + self._timeout
        try:
            future = _run_bounded(submit, self._timeout)
            return self._wait(future, deadline)
        except Exception as exc:
            raise _as_backend_error(what, exc, self._timeout) from exc

    @contextlib.contextmanager
    def _session(self) -> Iterator[tinker.ServiceClient]:
        """A Tinker session for one backend call, finished (success or errored) on exit."""
        try:
            service = tinker.ServiceClient(
                base_url=self._base_url,
                api_key=self._api_key,
                user_metadata={"app": "metaclaw"},
            )
        except Exception as exc:
            raise _as_backend_error("opening a session", exc, self._timeout) from exc
        status: Literal["success", "errored"] = "errored"
        try:
            yield service
            status = "success"
        finally:
            # Finishing is a courtesy to the service (it frees the session sooner); never let
            # it hang or mask the real outcome. It runs on its own thread because close()
            # takes a lock that a session start-up still retrying an unreachable service
            # holds for minutes.
            limit = min(self._timeout, 10.0)
            try:
                _run_bounded(lambda: service.close(status).result(timeout=limit), limit)
            except Exception as exc:
                logger.warning("Tinker: finishing the session failed: %s", exc)

    def _tokenizer_for(self, client: Any, base_model: str) -> ChatTokenizer:
        choice = self._tokenizer_choice
        if choice == "byte":
            return ByteChatTokenizer()
        if choice != "model":
            return choice  # type: ignore[return-value]
        with self._tokenizers_lock:
            cached = self._tokenizers.get(base_model)
        if cached is not None:
            return cached
        try:
            loaded = _run_bounded(lambda: client.get_tokenizer(), self._timeout)
        except Exception as exc:
            raise BackendError(
                f"Tinker: could not load the tokenizer of {base_model}: {exc}",
                retryable=isinstance(exc, (TimeoutError, OSError)),
            ) from exc
        tokenizer = HuggingFaceChatTokenizer(loaded)
        with self._tokenizers_lock:
            self._tokenizers[base_model] = tokenizer
        return tokenizer

    # -- training ----------------------------------------------------------------------------

    def _examples(
        self, samples: Sequence[ChatSample], config: TrainConfig, tokenizer: ChatTokenizer
    ) -> list[_Example]:
        advantages = _group_advantages(samples) if config.objective == "rl" else None
        examples: list[_Example] = []
        for index, sample in enumerate(samples):
            tokens, weights = tokenizer.encode_conversation(sample.messages)
            tokens, weights = tokens[: config.max_tokens], weights[: config.max_tokens]
            learned = sum(1 for w in weights[1:] if w > 0)
            if len(tokens) < 2 or learned == 0:
                logger.warning("Tinker: sample %d has no assistant tokens; skipped", index)
                continue
            if advantages is None:
                examples.append(_Example(_sft_datum(tokens, weights), learned))
            else:
                logprobs = _sampler_logprobs(sample.messages, weights)
                datum = _rl_datum(tokens, weights, advantages[index], logprobs)
                examples.append(_Example(datum, learned, reward=float(sample.reward or 0.0)))
        if not examples:
            raise BackendError("Tinker: no sample has assistant tokens to train on")
        return examples

    @staticmethod
    def _batch(
        examples: list[_Example], order: list[int], step: int, batch_size: int
    ) -> list[_Example]:
        # The batch depends only on the global step, so a resumed run continues the same
        # sequence of batches it would have seen without the pause.
        size = max(1, min(batch_size, len(examples)))
        return [examples[order[(step * size + i) % len(examples)]] for i in range(size)]

    def train(
        self,
        *,
        samples: Sequence[ChatSample],
        config: TrainConfig,
        on_step: Callable[[StepReport], None],
        should_pause: Callable[[], bool],
    ) -> TrainResult:
        """Run LoRA training on Tinker from ``config.start_step`` to ``config.total_steps``.

        Resumes from ``config.resume_from`` (a ``tinker://.../weights/...`` path from an
        earlier pause) with its optimizer state. On pause, saves the training state and
        returns it as ``state_ref``; on completion, saves sampler weights and returns them as
        ``adapter_ref``. Each step's ``metrics["loss"]`` is the mean loss per learned token.
        """
        if config.objective not in ("sft", "rl"):
            raise BackendError(f"Tinker: unknown objective {config.objective!r}")
        if not samples:
            raise BackendError("Tinker: no samples to train on")
        if config.resume_from is not None and not config.resume_from.startswith("tinker://"):
            raise BackendError(
                f"Tinker: cannot resume from {config.resume_from!r}: not a tinker:// path"
            )
        if config.objective == "rl":
            _group_advantages(samples)  # refuse missing rewards before starting a training run

        with self._session() as service:
            if config.resume_from is not None:
                path = config.resume_from
                trainer = self._call(
                    f"resuming from {path}",
                    lambda: service.create_training_client_from_state_with_optimizer(path),
                )
            else:
                trainer = self._call(
                    f"creating a LoRA training run on {config.base_model}",
                    lambda: service.create_lora_training_client(
                        base_model=config.base_model, rank=config.lora_rank, seed=config.seed
                    ),
                )
            tokenizer = self._tokenizer_for(trainer, config.base_model)
            examples = self._examples(samples, config, tokenizer)
            order = list(range(len(examples)))
            random.Random(config.seed).shuffle(order)
            loss_fn = "cross_entropy" if config.objective == "sft" else "importance_sampling"
            adam = types.AdamParams(learning_rate=config.learning_rate)

            step = config.start_step
            metrics: dict[str, float] = {}
            while step < config.total_steps:
                if should_pause():
                    name = f"metaclaw-step-{step:06d}"
                    saved = self._call("saving training state", partial(trainer.save_state, name))
                    return TrainResult(
                        status="paused",
                        steps_done=step,
                        state_ref=saved.path,
                        adapter_ref=None,
                        metrics=metrics,
                    )
                batch = self._batch(examples, order, step, config.batch_size)
                started = time.monotonic()
                metrics = self._train_step(trainer, batch, loss_fn, adam, step + 1)
                # Per step, so the run page can show throughput and the time left as it goes.
                seconds = time.monotonic() - started
                metrics["seconds"] = seconds
                metrics["tokens_per_second"] = metrics["tokens"] / seconds if seconds else 0.0
                step += 1
                on_step(StepReport(step=step, total_steps=config.total_steps, metrics=metrics))

            name = f"metaclaw-final-{step:06d}"
            saved = self._call(
                "saving sampler weights", lambda: trainer.save_weights_for_sampler(name)
            )
            return TrainResult(
                status="completed",
                steps_done=step,
                state_ref=None,
                adapter_ref=saved.path,
                metrics=metrics,
            )

    def _train_step(
        self,
        trainer: Any,
        batch: list[_Example],
        loss_fn: str,
        adam: types.AdamParams,
        step: int,
    ) -> dict[str, float]:
        what = f"training step {step}"
        deadline = time.monotonic() + self._timeout
        try:
            # Both requests go out before waiting, so the service can run them back to back.
            backward = trainer.forward_backward([e.datum for e in batch], loss_fn)
            optimize = trainer.optim_step(adam)
            output = self._wait(backward, deadline)
            self._wait(optimize, deadline)
        except Exception as exc:
            raise _as_backend_error(what, exc, self._timeout) from exc
        learned = sum(e.learned_tokens for e in batch)
        metrics = {
            "loss": float(output.metrics["loss:sum"]) / max(learned, 1),
            "tokens": float(learned),
        }
        if loss_fn == "importance_sampling":
            metrics["reward_mean"] = sum(e.reward for e in batch) / len(batch)
        return metrics

    # -- evaluation and sampling -------------------------------------------------------------

    def _sampler(
        self, service: tinker.ServiceClient, config: TrainConfig, adapter_ref: str | None
    ) -> Any:
        if adapter_ref is None:
            return self._call(
                f"opening a sampler on {config.base_model}",
                lambda: service.create_sampling_client(base_model=config.base_model),
            )
        return self._call(
            f"opening a sampler on {adapter_ref}",
            lambda: service.create_sampling_client(model_path=adapter_ref),
        )

    def evaluate(
        self, *, samples: Sequence[ChatSample], config: TrainConfig, adapter_ref: str | None
    ) -> dict[str, float]:
        """Mean negative log-likelihood per assistant token, with the adapter or without.

        Scored with the sampler's prompt logprobs (a forward pass, no backward): a sampler can
        load the ``sampler_weights`` path that training returns, and the base model, while a
        training client can load neither without starting a new training run.
        """
        if not samples:
            raise BackendError("Tinker: no samples to evaluate")
        with self._session() as service:
            sampler = self._sampler(service, config, adapter_ref)
            tokenizer = self._tokenizer_for(sampler, config.base_model)
            encoded = [tokenizer.encode_conversation(s.messages) for s in samples]
            encoded = [(t[: config.max_tokens], w[: config.max_tokens]) for t, w in encoded]
            encoded = [(t, w) for t, w in encoded if len(t) >= 2 and any(w[1:])]
            if not encoded:
                raise BackendError("Tinker: no sample has assistant tokens to evaluate")
            deadline = time.monotonic() + self._timeout
            try:
                futures = [
                    sampler.compute_logprobs(types.ModelInput.from_ints(tokens))
                    for tokens, _ in encoded
                ]
                scores = [self._wait(f, deadline) for f in futures]
            except Exception as exc:
                raise _as_backend_error("evaluation", exc, self._timeout) from exc
        nll = 0.0
        count = 0
        for (_, weights), logprobs in zip(encoded, scores, strict=True):
            # logprobs[i] scores token i given the tokens before it; token 0 has no score.
            for weight, logprob in zip(weights[1:], logprobs[1:], strict=False):
                if weight > 0 and logprob is not None:
                    nll -= weight * logprob
                    count += 1
        return {"loss": nll / max(count, 1), "tokens": float(count)}

    def sample(
        self,
        *,
        prompts: Sequence[list[dict[str, Any]]],
        config: TrainConfig,
        adapter_ref: str | None,
        max_tokens: int = 64,
    ) -> list[str]:
        """Greedy answers (top-k of 1) to each conversation, with the adapter or without."""
        if not prompts:
            return []
        with self._session() as service:
            sampler = self._sampler(service, config, adapter_ref)
            tokenizer = self._tokenizer_for(sampler, config.base_model)
            params = types.SamplingParams(
                max_tokens=max_tokens, top_k=1, seed=config.seed, stop=tokenizer.stop
            )
            deadline = time.monotonic() + self._timeout
            try:
                futures = [
                    sampler.sample(
                        types.ModelInput.from_ints(tokenizer.encode_prompt(p)), 1, params
                    )
                    for p in prompts
                ]
                responses = [self._wait(f, deadline) for f in futures]
            except Exception as exc:
                raise _as_backend_error("sampling", exc, self._timeout) from exc
        return [tokenizer.decode_completion(r.sequences[0].tokens) for r in responses]
