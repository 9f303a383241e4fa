"""Training API schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ninja import Schema
from pydantic import Field

from base.sanitize import CleanText


class DatasetOut(Schema):
    id: int
    content_hash: str
    objective: str
    generation_version: int | None
    train_count: int
    eval_count: int
    report: dict[str, Any]
    cutoff_at: datetime


class TrainingRunSummary(Schema):
    id: int
    status: str
    trigger: str
    backend: str
    base_model: str
    step: int
    total_steps: int
    pause_reason: str
    pause_requested: bool
    improved: bool | None
    flagged_no_improvement: bool
    verdict: str = Field(default="", description="What the candidate changes, in outcomes.")
    candidate_version: int | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @staticmethod
    def resolve_verdict(obj: Any) -> str:
        return (getattr(obj, "outcomes", None) or {}).get("verdict", "")

    @staticmethod
    def resolve_candidate_version(obj: Any) -> int | None:
        version = getattr(obj, "candidate_version", None)
        return version.number if version is not None and hasattr(version, "number") else version


class TrainingRunOut(TrainingRunSummary):
    hyperparameters: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    eval_before: dict[str, Any] | None
    eval_after: dict[str, Any] | None
    outcomes: dict[str, Any] = Field(
        description="Pass rates before (the active version) and after (the candidate) on "
        "held-out conversations, with Wilson 95 % intervals and n; the verdict."
    )
    search: dict[str, Any] = Field(
        description="The learning rates and steps the run tried, and why it kept one."
    )
    sample_answers: list[dict[str, Any]]
    state_ref: str
    state_step: int
    adapter_ref: str
    error: str
    log: str
    dataset: DatasetOut | None


class TrainingRunPage(Schema):
    items: list[TrainingRunSummary]
    next_cursor: str | None


class RunFilter(Schema):
    status: str | None = None
    cursor: str | None = None
    limit: int = 50


class RunActionIn(Schema):
    reason: CleanText = Field(default="", max_length=2000)


class IdleStatusOut(Schema):
    idle: bool
    reasons: list[str]
    in_window: bool
    window_label: str
    window_ends_at: datetime | None
    traffic_quiet: bool | None
    traffic: list[int]
    next_window_at: datetime | None
    next_window_label: str
    ready: bool
    readiness: list[str]
    new_samples: int
