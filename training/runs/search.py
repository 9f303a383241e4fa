"""The run's own choice of learning rate and steps, within a time budget, scored by outcomes.

Plain data in and out (the run's ``search`` JSON is the whole state), so a run paused in the
middle of a try resumes it. The plan:

1. Each learning rate of ``LR_GRID`` (highest first) trains ``RUNG_STEPS`` steps from scratch
   and is scored on the held-out cases (``outcomes.score``) and by held-out loss.
2. The best so far (most passes, then lower loss, then fewer steps) trains on from its
   checkpoint to twice its steps, up to ``MAX_STEPS``, and is scored again; this repeats while
   it does not get worse and not every case passes.
3. A try that the budget cannot pay for (seconds per step and per scoring, as measured so far)
   is not started; the first always is. Every try and the reason for the kept one are recorded.

A person who sets the learning rate or the steps pins them: the run trains once, as set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from training.backends.base import ChatSample, StepReport, TrainConfig, TrainingBackend
from training.runs import outcomes

LR_GRID = (1e-3, 3e-4, 1e-4)
RUNG_STEPS = 10
MAX_STEPS = 80


@dataclass
class SearchResult:
    """``paused``: the run must pause (``state_ref``/``step`` saved); otherwise the kept try."""

    paused: bool
    state_ref: str | None = None
    step: int = 0
    kept: dict[str, Any] | None = None


def new_state(budget_seconds: float, *, max_steps: int | None = None) -> dict[str, Any]:
    return {
        "budget_seconds": budget_seconds,
        "grid": list(LR_GRID),
        "rung_steps": RUNG_STEPS,
        "max_steps": max_steps or MAX_STEPS,
        "spent_seconds": 0.0,
        "trials": [],
        "in_progress": None,
        "kept": None,
        "reason": "",
    }


def planned_steps(state: dict[str, Any]) -> int:
    return len(state["grid"]) * state["rung_steps"] + state["max_steps"] - state["rung_steps"]


def _rank(trial: dict[str, Any]) -> tuple:
    loss = trial.get("loss")
    return (-trial["passed"], loss if loss is not None else float("inf"), trial["steps"])


def _next_try(state: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The next try (lr, from a trial's checkpoint or scratch, to how many steps), or None and
    why the search stops."""
    trials = state["trials"]
    if trials and max(t["passed"] == t["n"] for t in trials):
        return None, "every held-out case passes"
    tried = {t["lr"] for t in trials}
    for lr in state["grid"]:
        if lr not in tried:
            return {"lr": lr, "from": None, "to": state["rung_steps"]}, ""
    best = min(trials, key=_rank)
    last = trials[-1]
    if last["continued_from"] is not None and last is not best:
        return None, "training on did no better than the checkpoint it started from"
    if best["steps"] >= state["max_steps"] or not best.get("state_ref"):
        return None, f"the best try reached the most steps ({state['max_steps']})"
    return {
        "lr": best["lr"],
        "from": trials.index(best),
        "to": min(state["max_steps"], 2 * best["steps"]),
    }, ""


def _estimate(state: dict[str, Any], steps: int) -> float:
    trials = state["trials"]
    done = sum(t["trained_steps"] for t in trials)
    if not done:
        return 0.0
    per_step = sum(t["train_seconds"] for t in trials) / done
    scoring = sum(t["score_seconds"] for t in trials) / len(trials)
    return per_step * steps + scoring


def search_run(
    *,
    backend: TrainingBackend,
    train: Sequence[ChatSample],
    held_out: Sequence[ChatSample],
    cases: Sequence[outcomes.OutcomeCase],
    config: TrainConfig,
    state: dict[str, Any],
    on_step: Callable[[StepReport], None],
    should_pause: Callable[[], bool],
    save: Callable[[dict[str, Any]], None],
) -> SearchResult:
    """Go on with the search in ``state`` (changed in place and handed to ``save`` after every
    try) until it ends or ``should_pause`` asks to pause."""
    started = time.monotonic()
    done_steps = sum(t["trained_steps"] for t in state["trials"])
    while True:
        resuming = state.get("in_progress")
        if resuming:
            step_try = resuming
        else:
            step_try, reason = _next_try(state)
            if step_try is None:
                break
            cost = _estimate(state, step_try["to"] - _from_steps(state, step_try))
            spent = state["spent_seconds"] + time.monotonic() - started
            if state["trials"] and spent + cost > state["budget_seconds"]:
                reason = (
                    f"the next try (lr {step_try['lr']:g} to {step_try['to']} steps, about "
                    f"{cost:.0f} s) would pass the {state['budget_seconds']:.0f} s budget"
                )
                break
        from_steps = resuming["at"] if resuming else _from_steps(state, step_try)
        resume_from = resuming["state_ref"] if resuming else _state_ref(state, step_try)
        target = step_try["to"]
        trial_config = replace(
            config,
            learning_rate=step_try["lr"],
            total_steps=state["max_steps"],
            start_step=from_steps,
            resume_from=resume_from,
            output_dir=str(Path(config.output_dir) / f"lr-{step_try['lr']:g}-to-{target}"),
        )
        began = time.monotonic()
        result, paused_by_run = _train_to(
            backend,
            train,
            trial_config,
            target=target,
            offset=done_steps - from_steps,
            planned=planned_steps(state),
            on_step=on_step,
            should_pause=should_pause,
        )
        train_seconds = time.monotonic() - began + (resuming or {}).get("seconds", 0.0)
        done_steps += result.steps_done - from_steps
        if paused_by_run:
            state["in_progress"] = {
                **step_try,
                "at": result.steps_done,
                "state_ref": result.state_ref,
                "seconds": train_seconds,
                "trained_from": (resuming or {}).get("trained_from", from_steps),
            }
            state["spent_seconds"] += time.monotonic() - started
            save(state)
            return SearchResult(paused=True, state_ref=result.state_ref, step=done_steps)
        if result.status == "paused":
            state_ref = result.state_ref
            adapter_ref = str(Path(result.state_ref or "") / "adapter")
        else:
            state_ref, adapter_ref = None, result.adapter_ref
        scored = outcomes.score(backend, cases, config=trial_config, adapter_ref=adapter_ref)
        loss = backend.evaluate(samples=held_out, config=trial_config, adapter_ref=adapter_ref)
        trained_from = (resuming or {}).get("trained_from", from_steps)
        state["trials"].append(
            {
                "lr": step_try["lr"],
                "steps": result.steps_done,
                "continued_from": step_try["from"],
                "trained_steps": result.steps_done - trained_from,
                "passed": scored["passed"],
                "n": scored["n"],
                "rate": scored["rate"],
                "low": scored["low"],
                "high": scored["high"],
                "loss": outcomes_loss(loss),
                "train_seconds": round(train_seconds, 2),
                "score_seconds": scored["seconds"],
                "adapter_ref": adapter_ref,
                "state_ref": state_ref,
                "answers": [a[:300] for a in scored["answers"]],
            }
        )
        state["in_progress"] = None
        state["spent_seconds"] += time.monotonic() - started
        started = time.monotonic()
        save(state)
    best = min(state["trials"], key=_rank)
    state["kept"] = state["trials"].index(best)
    state["reason"] = (
        f"Kept lr {best['lr']:g} × {best['steps']} steps: {best['passed']}/{best['n']} held-out "
        f"cases passed, the most of {len(state['trials'])} tries (ties go to the lower held-out "
        f"loss, then to fewer steps). The search stopped because {reason}."
    )
    save(state)
    return SearchResult(paused=False, kept=best)


def _train_to(
    backend: TrainingBackend,
    train: Sequence[ChatSample],
    config: TrainConfig,
    *,
    target: int,
    offset: int,
    planned: int,
    on_step: Callable[[StepReport], None],
    should_pause: Callable[[], bool],
) -> tuple[Any, bool]:
    """Train from ``config.start_step`` until step ``target`` (a checkpoint, unless that is the
    last step) or until the run asks to pause (then True)."""
    reached = {"step": config.start_step}
    asked = {"pause": False}

    def step_done(report: StepReport) -> None:
        reached["step"] = report.step
        on_step(
            StepReport(
                step=offset + report.step,
                total_steps=max(planned, offset + report.step),
                metrics={**report.metrics, "learning_rate": config.learning_rate},
            )
        )

    def pause_here() -> bool:
        if should_pause():
            asked["pause"] = True
            return True
        return reached["step"] >= target

    result = backend.train(samples=train, config=config, on_step=step_done, should_pause=pause_here)
    return result, asked["pause"]


def _from_steps(state: dict[str, Any], step_try: dict[str, Any]) -> int:
    return 0 if step_try["from"] is None else state["trials"][step_try["from"]]["steps"]


def _state_ref(state: dict[str, Any], step_try: dict[str, Any]) -> str | None:
    return None if step_try["from"] is None else state["trials"][step_try["from"]]["state_ref"]


def outcomes_loss(metrics: dict[str, float]) -> float | None:
    loss = metrics.get("loss")
    return round(float(loss), 5) if loss is not None else None
