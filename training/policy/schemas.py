"""Training settings API schemas: what ``idle_policy_settings`` shows and what
``idle_policy_update`` takes. Types are checked here; ranges, choices, time zones, windows and
calendars by the service, as for the dashboard's form."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ninja import Schema
from pydantic import ConfigDict, Field, create_model


class _Strict(Schema):
    # A misspelt setting is refused (422 naming it), never ignored.
    model_config = ConfigDict(extra="forbid")


class TrainingSettingsIn(_Strict):
    """Every setting (PUT replaces them all; GET's answer, sent back, changes nothing)."""

    auto_train: bool = Field(description="Start runs on their own when idle and ready.")
    mode: str = Field(description="Idle when: either | both | calendar | traffic.")
    timezone: str = Field(description="The time zone of the weekly windows, e.g. Europe/Berlin.")
    weekly_windows: str = Field(description='One window a line: "mon-fri 01:00-05:00".')
    ical_url: str = Field(description="An iCalendar feed whose events mark quiet windows.")
    ical_text: str = Field(description="iCalendar (.ics) content.")
    traffic_threshold_rpm: int = Field(description="Quiet below this many requests a minute.")
    traffic_idle_minutes: int = Field(description="For this many minutes (1-120).")
    min_new_samples: int = Field(description="New usable samples a run needs.")
    max_runs_per_day: int = Field(description="Runs per 24 hours at most.")
    max_tokens_per_run: int = Field(description="Tokens in a run's dataset at most.")
    max_sample_tokens: int = Field(description="Longer samples are cut or dropped.")
    eval_fraction: float = Field(description="The held-out share of sessions (0.01-0.89).")
    stale_after_minutes: int = Field(description="A run without a heartbeat this long is stale.")
    backend: str = Field(description="local | tinker.")
    backend_options: dict[str, Any] = Field(
        description="Backend options (JSON object); a masked secret sent back keeps its value."
    )
    base_model: str = Field(description="The base model to fine-tune.")
    objective: str = Field(description="sft | rl.")
    lora_rank: int = Field(description="LoRA rank (1-256).")
    learning_rate: float = Field(description="Learning rate, in (0, 1].")
    batch_size: int = Field(description="Samples a step (1-512).")
    total_steps: int = Field(description="Optimizer steps a run (1-100000).")
    search_budget_minutes: int | None = Field(
        default=None,
        description="Minutes a run may spend choosing its learning rate and steps (0: use "
        "learning_rate and total_steps as set; setting either of them sets this to 0). "
        "Left out: unchanged.",
    )


# PATCH: any subset of the same settings.
TrainingSettingsPatch = create_model(
    "TrainingSettingsPatch",
    __base__=_Strict,
    **{
        name: (field.annotation | None, Field(default=None, description=field.description))
        for name, field in TrainingSettingsIn.model_fields.items()
    },
)


class TrainingSettingsOut(TrainingSettingsIn):
    model_config = ConfigDict(extra="ignore")

    updated_at: datetime | None
