"""The training app's models, for Django's registry: each is defined beside the capability that
owns it, and code imports it from there (``training.runs.models``, ...)."""

from training.datasets.models import DatasetSnapshot
from training.policy.models import Backend, IdleMode, IdleWindowPolicy, Objective
from training.runs.models import (
    ACTIVE_RUN_STATUSES,
    FINAL_RUN_STATUSES,
    PauseReason,
    RunStatus,
    TrainingRun,
    Trigger,
)

__all__ = [
    "ACTIVE_RUN_STATUSES",
    "Backend",
    "DatasetSnapshot",
    "FINAL_RUN_STATUSES",
    "IdleMode",
    "IdleWindowPolicy",
    "Objective",
    "PauseReason",
    "RunStatus",
    "TrainingRun",
    "Trigger",
]
