"""A run on the worker's side: its samples and configuration, the backend's training loop (paused
when the idle window closes, a person asks, or the worker's time slice ends), evaluation and the
candidate version it offers; and the beat task's decision to start or resume a run."""

from __future__ import annotations

import logging
import os
import time as time_module
from collections.abc import Callable
from dataclasses import replace
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
from training.policy.selectors import auto_training_on
from training.policy.services import idle_policy_get, project_idle_status
from training.runs import outcomes as outcome_judge
from training.runs import search as hp_search
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


def outcome_cases(dataset: DatasetSnapshot) -> list[outcome_judge.OutcomeCase]:
    """The held-out samples with a target to judge an answer by (``outcomes``' docstring): a
    check their trajectory or incident carries, the incident's expected outcome, or a corrected
    answer. Ordinary successful turns have none."""
    from incidents.models import Incident, Trajectory

    rows = [s for s in dataset.samples if s["split"] == "eval"]
    trajectory_meta = dict(
        Trajectory.objects.filter(
            id__in=[r["trajectory_id"] for r in rows if r.get("trajectory_id")]
        ).values_list("id", "metadata")
    )
    incidents = {  # keyed as the samples name them: a UUID's text
        str(i["id"]): i
        for i in Incident.objects.filter(
            id__in=[r["incident_id"] for r in rows if r.get("incident_id")]
        ).values("id", "metadata", "expected_outcome")
    }
    cases = []
    for row in rows:
        incident = incidents.get(str(row.get("incident_id"))) or {}
        metadata = incident.get("metadata") or trajectory_meta.get(_uuid(row)) or {}
        check = outcome_judge.clean_check(metadata.get("check") if metadata else None)
        expected = (incident.get("expected_outcome") or "").strip()
        if not (check or expected or row["kind"] == "corrected"):
            continue
        messages = row["messages"]
        cases.append(
            outcome_judge.OutcomeCase(
                prompt=messages[:-1],
                reference=messages[-1]["content"],
                check=check,
                expected=expected,
            )
        )
    return cases


def _uuid(row: dict) -> object:
    import uuid

    try:
        return uuid.UUID(str(row.get("trajectory_id")))
    except ValueError:
        return None


def _active_adapter(run: TrainingRun) -> str | None:
    """The adapter the project serves now, when it is one of this run's base model."""
    from skills.versions.models import PolicyVersion, VersionStatus

    active = PolicyVersion.objects.filter(project=run.project, status=VersionStatus.ACTIVE).first()
    if active is None or not active.adapter_ref or active.base_model != run.base_model:
        return None
    return active.adapter_ref


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
        if run is None:  # cancelled while its dataset was built
            return TrainingRun.objects.get(pk=run_id)
        dataset = run.dataset
        assert dataset is not None
        if run.pause_requested:
            return run_services.training_run_pause_prepared(run_id=run_id)
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
        cases = outcome_cases(dataset)
        active = _active_adapter(run)
        if not run.adapter_ref:
            run = run_services.training_run_start_training(run_id=run_id)
            if run.eval_before is None:
                before = backend.evaluate(samples=held_out, config=config, adapter_ref=active)
                scored = _score(backend, cases, config, active)
                TrainingRun.objects.filter(pk=run_id).update(
                    eval_before=_clean_metrics(before),
                    outcomes={"before": scored} if scored else {},
                    heartbeat_at=_now(),
                )
            pause_check = _PauseCheck(
                run, clock=clock, deadline=deadline, every_seconds=idle_check_every_seconds
            )

            def on_step(report: StepReport) -> None:
                run_services.training_run_record_step(run_id=run_id, report=report)

            budget = float(run.hyperparameters.get("search_budget_seconds", 0) or 0)
            if budget > 0 and cases:
                found = hp_search.search_run(
                    backend=backend,
                    train=train,
                    held_out=held_out,
                    cases=cases,
                    config=config,
                    state=run.search or hp_search.new_state(budget),
                    on_step=on_step,
                    should_pause=pause_check,
                    save=lambda state: run_services.training_run_record_search(
                        run_id=run_id, search=state
                    ),
                )
                if found.paused:
                    return _paused(run_id, pause_check, found.state_ref, found.step)
                assert found.kept is not None
                adapter_ref = found.kept["adapter_ref"]
                summary = {"loss": found.kept["loss"], "train_seconds": found.kept["train_seconds"]}
            else:
                result = backend.train(
                    samples=train, config=config, on_step=on_step, should_pause=pause_check
                )
                if result.status == "paused":
                    return _paused(run_id, pause_check, result.state_ref, result.steps_done)
                adapter_ref = result.adapter_ref or ""
                summary = result.metrics
            run = run_services.training_run_start_evaluating(
                run_id=run_id, adapter_ref=adapter_ref, summary=_clean_metrics(summary)
            )
        else:
            run = run_services.training_run_start_evaluating(
                run_id=run_id, adapter_ref=run.adapter_ref, summary=run.summary
            )
        return _evaluate_and_offer(run, backend, config, held_out, cases)
    except BackendError as exc:
        return run_services.training_run_fail(run_id=run_id, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the UI must show why, not "training" forever
        logger.exception("Training run %s failed.", run_id)
        return run_services.training_run_fail(run_id=run_id, error=f"{type(exc).__name__}: {exc}")


def _paused(run_id: int, pause_check: _PauseCheck, state_ref: str | None, step: int) -> TrainingRun:
    reason = pause_check.reason or PauseReason.REQUESTED
    if reason == "stopped":
        logger.info("Run %s stopped (cancelled or stale) after a step.", run_id)
        return TrainingRun.objects.get(pk=run_id)
    return run_services.training_run_mark_paused(
        run_id=run_id, state_ref=state_ref, step=step, reason=reason
    )


def _score(
    backend: TrainingBackend,
    cases: list[outcome_judge.OutcomeCase],
    config: TrainConfig,
    adapter_ref: str | None,
) -> dict | None:
    if not cases:
        return None
    return _short_answers(
        outcome_judge.score(backend, cases, config=config, adapter_ref=adapter_ref)
    )


def _short_answers(scored: dict) -> dict:
    return {**scored, "answers": [a[:300] for a in scored.get("answers", [])]}


def _clean_metrics(metrics: dict) -> dict:
    return {k: run_services.finite(v) for k, v in metrics.items()}


def _evaluate_and_offer(
    run: TrainingRun,
    backend: TrainingBackend,
    config: TrainConfig,
    held_out: list[ChatSample],
    cases: list[outcome_judge.OutcomeCase],
) -> TrainingRun:
    """Judge the candidate against the active version by outcomes (loss when no held-out
    sample has a target), keep up to three answers side by side, offer it when it improved."""
    from skills.versions import services as skill_services

    run.refresh_from_db()
    active = _active_adapter(run)
    if run.search.get("trials") and run.search.get("kept") is not None:
        config = replace(config, learning_rate=run.search["trials"][run.search["kept"]]["lr"])
    after = _clean_metrics(
        backend.evaluate(samples=held_out, config=config, adapter_ref=run.adapter_ref)
    )
    run_services.training_run_heartbeat(run_id=run.pk)
    before = run.eval_before or {}
    before_loss, after_loss = before.get("loss"), after.get("loss")
    judged = dict(run.outcomes or {})
    if cases:
        judged.setdefault("before", _score(backend, cases, config, active))
        kept = run.search.get("kept") if run.search else None
        judged["after"] = (
            _short_answers(run.search["trials"][kept])
            if kept is not None
            else _score(backend, cases, config, run.adapter_ref)
        )
        improved, verdict = outcome_judge.verdict(judged["before"], judged["after"])
        judged["difference"] = list(
            outcome_judge.difference_interval(
                (judged["before"]["passed"], judged["before"]["n"]),
                (judged["after"]["passed"], judged["after"]["n"]),
            )
        )
        judged["judged_by"] = "outcomes"
        shown = list(range(min(SIDE_BY_SIDE_SAMPLES, len(cases))))
        side_by_side = [
            {
                "prompt": cases[i].prompt,
                "reference": cases[i].reference,
                "before": judged["before"]["answers"][i],
                "after": judged["after"]["answers"][i],
                "passed_before": outcome_judge.passes(cases[i], judged["before"]["answers"][i]),
                "passed_after": outcome_judge.passes(cases[i], judged["after"]["answers"][i]),
            }
            for i in shown
        ]
    else:
        improved = (
            before_loss is not None
            and after_loss is not None
            and after_loss < before_loss * (1 - MIN_IMPROVEMENT)
        )
        verdict = (
            "No held-out conversation carries a target to judge an answer by (a corrected "
            "answer, an expected outcome or a check): judged by held-out loss alone, "
            f"{before_loss} → {after_loss}" + (" (improved)." if improved else " (no improvement).")
        )
        judged = {"judged_by": "loss"}
        side_by_side = _side_by_side(backend, config, held_out, active, run.adapter_ref)
    judged["verdict"] = verdict
    if run.search.get("reason"):
        judged["search"] = run.search["reason"]
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
                f"({dataset.train_count if dataset else 0} samples). {verdict} "
                + (f"{run.search['reason']} " if run.search.get("reason") else "")
                + f"Held-out loss {before_loss} → {after_loss}."
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
        outcomes=judged,
    )


def _side_by_side(
    backend: TrainingBackend,
    config: TrainConfig,
    held_out: list[ChatSample],
    active: str | None,
    adapter_ref: str,
) -> list[dict]:
    shown = held_out[:SIDE_BY_SIDE_SAMPLES]
    prompts = [s.messages[:-1] for s in shown]
    answers_before = backend.sample(
        prompts=prompts, config=config, adapter_ref=active, max_tokens=SAMPLE_MAX_TOKENS
    )
    answers_after = backend.sample(
        prompts=prompts, config=config, adapter_ref=adapter_ref, max_tokens=SAMPLE_MAX_TOKENS
    )
    return [
        {"prompt": prompt, "reference": sample.messages[-1]["content"], "before": b, "after": a}
        for prompt, sample, b, a in zip(prompts, shown, answers_before, answers_after, strict=True)
    ]


# --- The beat task's decision ---------------------------------------------------------------


def training_schedule_tick(*, project: Project, now: datetime | None = None) -> TrainingRun | None:
    """Once a minute per project with automatic training: when idle, resume a run that paused
    on its own (window, time slice, stale worker), or start one when the project is ready."""
    now = now or _now()
    policy = idle_policy_get(project)
    if not auto_training_on(policy):
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
