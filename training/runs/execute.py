"""A run on the worker's side: its samples and configuration, the backend's training loop (paused
when the idle window closes, a person asks, or the worker's time slice ends), evaluation and the
candidate version it offers; and the beat task's decision to start or resume a run."""

from __future__ import annotations

import logging
import os
import time as time_module
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from base.errors import Conflict
from base.models import Project
from training.backends import BackendError, get_backend
from training.backends.base import ChatSample, StepReport, TrainConfig, TrainingBackend
from training.datasets.models import DatasetSnapshot
from training.policy.models import Objective
from training.policy.services import idle_policy_get, project_idle_status
from training.runs import services as run_services
from training.runs.models import PauseReason, RunStatus, TrainingRun, Trigger

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# A run improves when the held-out loss falls by at least this fraction.
MIN_IMPROVEMENT = 0.001
SIDE_BY_SIDE_SAMPLES = 3
SAMPLE_MAX_TOKENS = 48


def _now() -> datetime:
    return timezone.now()


# --- Executing a run (the worker's side) ----------------------------------------------------


def _samples(dataset: DatasetSnapshot, split: str, *, objective: str) -> list[ChatSample]:
    rows = [s for s in dataset.samples if s["split"] == split]
    if split == "eval" or objective != Objective.RL:
        # Loss on answers worth imitating: good and corrected ones.
        rows = [s for s in rows if s["kind"] in ("sft", "corrected")] or rows
    return [
        ChatSample(messages=s["messages"], reward=s.get("reward"), group=s.get("group"))
        for s in rows
    ]


def _output_dir(run: TrainingRun) -> str:
    root = getattr(settings, "METACLAW_TRAINING_DIR", None) or os.environ.get(
        "METACLAW_TRAINING_DIR", ""
    )
    base = Path(root) if root else Path(settings.VAR_DIR) / "training"
    return str(base / "runs" / str(run.pk))


def run_config(run: TrainingRun) -> TrainConfig:
    hyper = run.hyperparameters
    return TrainConfig(
        base_model=run.base_model,
        objective=hyper.get("objective", "sft"),
        lora_rank=int(hyper.get("lora_rank", 8)),
        learning_rate=float(hyper.get("learning_rate", 1e-4)),
        batch_size=int(hyper.get("batch_size", 4)),
        total_steps=int(hyper.get("total_steps", 20)),
        max_tokens=int(hyper.get("max_tokens", 1024)),
        seed=int(hyper.get("seed", 0)),
        output_dir=_output_dir(run),
        resume_from=run.state_ref or None,
        start_step=run.state_step if run.state_ref else 0,
    )


class _PauseCheck:
    """``should_pause`` for a backend: a pause request, a cancel, the end of the idle window
    (scheduled runs only) or the worker's time slice. Remembers why."""

    def __init__(
        self, run: TrainingRun, *, clock: Clock, deadline: float | None, every_seconds: float
    ) -> None:
        self.run_id = run.pk
        self.project = run.project
        self.scheduled = run.trigger == Trigger.SCHEDULE
        self.clock = clock
        self.deadline = deadline
        self.every = every_seconds
        self.last_idle_check = 0.0
        self.reason = ""

    def __call__(self) -> bool:
        if self.deadline is not None and time_module.monotonic() >= self.deadline:
            self.reason = PauseReason.TIME_SLICE
            return True
        row = TrainingRun.objects.filter(pk=self.run_id).values("status", "pause_requested").first()
        if row is None or row["status"] != RunStatus.TRAINING:
            self.reason = "stopped"
            return True
        if row["pause_requested"]:
            self.reason = PauseReason.REQUESTED
            return True
        if self.scheduled and time_module.monotonic() - self.last_idle_check >= self.every:
            self.last_idle_check = time_module.monotonic()
            if not project_idle_status(project=self.project, now=self.clock()).idle:
                self.reason = PauseReason.NOT_IDLE
                return True
        return False


def training_run_execute(
    *,
    run_id: int,
    backend: TrainingBackend | None = None,
    clock: Clock | None = None,
    deadline: float | None = None,
    idle_check_every_seconds: float = 5.0,
) -> TrainingRun | None:
    """The whole slow loop for one queued run: claim, snapshot, train (pausing when asked),
    evaluate before/after, and offer a candidate version when the held-out loss improved.

    ``clock`` is what the idle checks read (a test freezes it); records use the real time.
    Idempotent: a run that is not QUEUED is left alone (returns None). ``deadline`` is a
    ``time.monotonic()`` moment at which training pauses itself (the task's time slice)."""
    clock = clock or _now
    if not run_services.training_run_claim(run_id=run_id):
        return None
    try:
        run = run_services.training_run_prepare(run_id=run_id)
        dataset = run.dataset
        assert dataset is not None
        objective = run.hyperparameters.get("objective", "sft")
        train = _samples(dataset, "train", objective=objective)
        held_out = _samples(dataset, "eval", objective=objective)
        if not train or not held_out:
            return run_services.training_run_fail(
                run_id=run_id,
                error=(
                    f"Not enough clean data: {len(train)} train and {len(held_out)} held-out "
                    "samples (both sides need at least one; see the dataset report)."
                ),
            )
        backend = backend or get_backend(run.backend, **(run.backend_options or {}))
        config = run_config(run)
        if not run.adapter_ref:
            run = run_services.training_run_start_training(run_id=run_id)
            if run.eval_before is None:
                before = backend.evaluate(samples=held_out, config=config, adapter_ref=None)
                TrainingRun.objects.filter(pk=run_id).update(
                    eval_before=_clean_metrics(before), heartbeat_at=_now()
                )
            pause_check = _PauseCheck(
                run, clock=clock, deadline=deadline, every_seconds=idle_check_every_seconds
            )

            def on_step(report: StepReport) -> None:
                run_services.training_run_record_step(run_id=run_id, report=report)

            result = backend.train(
                samples=train, config=config, on_step=on_step, should_pause=pause_check
            )
            if result.status == "paused":
                reason = pause_check.reason or PauseReason.REQUESTED
                if reason == "stopped":
                    logger.info("Run %s stopped (cancelled or stale) after a step.", run_id)
                    return TrainingRun.objects.get(pk=run_id)
                return run_services.training_run_mark_paused(
                    run_id=run_id,
                    state_ref=result.state_ref,
                    step=result.steps_done,
                    reason=reason,
                )
            run = run_services.training_run_start_evaluating(
                run_id=run_id,
                adapter_ref=result.adapter_ref or "",
                summary=_clean_metrics(result.metrics),
            )
        else:
            run = run_services.training_run_start_evaluating(
                run_id=run_id, adapter_ref=run.adapter_ref, summary=run.summary
            )
        return _evaluate_and_offer(run, backend, config, held_out)
    except BackendError as exc:
        return run_services.training_run_fail(run_id=run_id, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the UI must show why, not "training" forever
        logger.exception("Training run %s failed.", run_id)
        return run_services.training_run_fail(run_id=run_id, error=f"{type(exc).__name__}: {exc}")


def _clean_metrics(metrics: dict) -> dict:
    return {k: run_services.finite(v) for k, v in metrics.items()}


def _evaluate_and_offer(
    run: TrainingRun, backend: TrainingBackend, config: TrainConfig, held_out: list[ChatSample]
) -> TrainingRun:
    from skills.versions import services as skill_services

    run.refresh_from_db()
    after = _clean_metrics(
        backend.evaluate(samples=held_out, config=config, adapter_ref=run.adapter_ref)
    )
    run_services.training_run_heartbeat(run_id=run.pk)
    before = run.eval_before or {}
    shown = held_out[:SIDE_BY_SIDE_SAMPLES]
    prompts = [s.messages[:-1] for s in shown]
    answers_before = backend.sample(
        prompts=prompts, config=config, adapter_ref=None, max_tokens=SAMPLE_MAX_TOKENS
    )
    answers_after = backend.sample(
        prompts=prompts, config=config, adapter_ref=run.adapter_ref, max_tokens=SAMPLE_MAX_TOKENS
    )
    side_by_side = [
        {
            "prompt": prompt,
            "reference": sample.messages[-1]["content"],
            "before": b,
            "after": a,
        }
        for prompt, sample, b, a in zip(prompts, shown, answers_before, answers_after, strict=True)
    ]
    before_loss, after_loss = before.get("loss"), after.get("loss")
    improved = (
        before_loss is not None
        and after_loss is not None
        and after_loss < before_loss * (1 - MIN_IMPROVEMENT)
    )
    candidate = None
    if improved:
        dataset = run.dataset
        candidate = skill_services.policy_version_create_candidate(
            project=run.project,
            adapter_ref=run.adapter_ref,
            base_model=run.base_model,
            changelog=(
                f"LoRA adapter from training run #{run.pk} ({run.backend}, {run.step} steps) on "
                f"dataset {dataset.content_hash[:12] if dataset else '?'} "
                f"({dataset.train_count if dataset else 0} samples): held-out loss "
                f"{before_loss:.4f} → {after_loss:.4f}."
            ),
            actor=None,
            actor_label=f"training-run:{run.pk}",
        )
    return run_services.training_run_succeed(
        run_id=run.pk,
        eval_after=after,
        sample_answers=side_by_side,
        candidate=candidate,
        improved=improved,
    )


# --- The beat task's decision ---------------------------------------------------------------


def training_schedule_tick(*, project: Project, now: datetime | None = None) -> TrainingRun | None:
    """Once a minute per project with automatic training: when idle, resume a run that paused
    on its own (window, time slice, stale worker), or start one when the project is ready."""
    now = now or _now()
    policy = idle_policy_get(project)
    if policy.pk is None or not policy.auto_train:
        return None
    if not project_idle_status(project=project, now=now, policy=policy).idle:
        return None
    paused = (
        TrainingRun.objects.filter(project=project, status=RunStatus.PAUSED)
        .exclude(pause_reason=PauseReason.REQUESTED)
        .first()
    )
    if paused is not None:
        return run_services.training_run_resume(run=paused, actor=None, actor_label="schedule")
    if not run_services.project_training_readiness(project=project, now=now, policy=policy).ready:
        return None
    try:
        return run_services.training_run_create(
            project=project, actor=None, actor_label="schedule", trigger=Trigger.SCHEDULE
        )
    except Conflict:
        return None
