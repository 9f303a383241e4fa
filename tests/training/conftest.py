"""Fixtures the training tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def training_dir(settings, tmp_path):
    """Runs write their datasets, checkpoints and adapters under the test's own folder."""
    settings.METACLAW_TRAINING_DIR = str(tmp_path / "training")


@pytest.fixture
def no_enqueue(monkeypatch) -> list[int]:
    """The ids of the runs queued, in place of the Celery task: the test executes them itself
    (so it can hand in a clock, or run one on a thread of its own), or not at all."""
    queued: list[int] = []
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", queued.append)
    return queued
