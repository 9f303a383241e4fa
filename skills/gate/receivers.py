"""The replay gate's side of the skills app's signals."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from skills import signals
from skills.gate.models import GateMode
from skills.gate.services import promotion_check, replay_gate_request

logger = logging.getLogger(__name__)


@receiver(signals.version_promoting)
def refuse_an_ungated_promotion(sender, project, version, **kwargs) -> None:
    """Inside the promotion's transaction: raises Conflict when the gate is required."""
    promotion_check(project=project, version=version)


@receiver(signals.version_candidate_created)
def gate_a_new_candidate(sender, version, **kwargs) -> None:
    """After commit: a project with the gate on replays each new candidate at once."""
    if version.project.replay_gate_mode == GateMode.OFF:
        return
    try:
        replay_gate_request(version=version, actor=None, actor_label="replay gate")
    except Exception:  # noqa: BLE001 - the candidate stands; an admin can run the gate
        logger.exception("Could not request a replay gate for version %s.", version.pk)
