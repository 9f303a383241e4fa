"""The one interface every training backend implements.

The slow loop (``training.runs.execute``) builds a list of ``ChatSample`` from a cleaned
``DatasetSnapshot`` and hands it to a backend together with a ``TrainConfig``. Backends know
nothing about Django: they take plain data in and give plain data back, so they can be tested
and benchmarked on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Objective = Literal["sft", "rl"]


class BackendError(Exception):
    """A backend failed in a way the run should record (and may retry)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ChatSample:
    """One training example: an OpenAI-format conversation.

    For SFT the loss is taken on assistant tokens only. For RL, ``reward`` is the scalar
    outcome and ``group`` names the set of samples whose mean reward is the baseline
    (advantage = reward - mean reward of its group).
    """

    messages: list[dict[str, Any]]
    reward: float | None = None
    group: str | None = None


def group_advantages(samples: Sequence[ChatSample], *, missing_reward: str) -> list[float]:
    """The RL advantage of each sample: its reward minus the mean reward of its group (samples
    without a group share one). Raises ``BackendError(missing_reward)`` when a sample has no
    reward, so each backend words the refusal its own way."""
    rewards: dict[str | None, list[float]] = {}
    for sample in samples:
        if sample.reward is None:
            raise BackendError(missing_reward)
        rewards.setdefault(sample.group, []).append(sample.reward)
    baseline = {group: sum(values) / len(values) for group, values in rewards.items()}
    return [float(s.reward) - baseline[s.group] for s in samples]  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainConfig:
    base_model: str
    objective: Objective = "sft"
    lora_rank: int = 8
    learning_rate: float = 1e-4
    batch_size: int = 4
    total_steps: int = 20
    max_tokens: int = 1024
    seed: int = 0
    # Where the backend may write files (local adapters, logs). Tinker ignores it.
    output_dir: str = ""
    # A checkpoint reference returned earlier as ``TrainResult.state_ref``: resume from it.
    resume_from: str | None = None
    # Steps already done before ``resume_from`` was saved (so progress keeps counting).
    start_step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based, counted across pauses
    total_steps: int
    metrics: dict[str, float]  # at least {"loss": ...}


@dataclass(frozen=True)
class TrainResult:
    status: Literal["completed", "paused"]
    steps_done: int
    # Resumable state (optimizer included): a local folder or a tinker://.../weights/... path.
    state_ref: str | None
    # What serves the result: a local adapter folder or a tinker://.../sampler_weights/... path.
    adapter_ref: str | None
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingBackend(Protocol):
    name: str

    def train(
        self,
        *,
        samples: Sequence[ChatSample],
        config: TrainConfig,
        on_step: Callable[[StepReport], None],
        should_pause: Callable[[], bool],
    ) -> TrainResult:
        """Run up to ``config.total_steps`` optimizer steps from ``config.start_step``.

        Calls ``on_step`` after every optimizer step. Checks ``should_pause`` between
        steps; when it answers True, saves resumable state and returns ``status="paused"``.
        Raises ``BackendError`` on failure.
        """
        ...

    def evaluate(
        self, *, samples: Sequence[ChatSample], config: TrainConfig, adapter_ref: str | None
    ) -> dict[str, float]:
        """Mean per-token loss on assistant tokens of ``samples`` (``{"loss": ...}``), with the
        adapter applied, or on the base model when ``adapter_ref`` is None."""
        ...

    def sample(
        self,
        *,
        prompts: Sequence[list[dict[str, Any]]],
        config: TrainConfig,
        adapter_ref: str | None,
        max_tokens: int = 64,
    ) -> list[str]:
        """Greedy answers to each conversation, for side-by-side display in the UI."""
        ...
