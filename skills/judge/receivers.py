"""The judge's side of the skills app's signals: every new revision (proposed by the fast
loop, edited, imported) waits for the judge. These run after commit; a failure here must not
hide the proposal, so it is logged (the revision shows no judge state, and no sweep sends it)."""

from __future__ import annotations

import logging

from django.dispatch import receiver

from skills import signals
from skills.judge.services import revisions_judge_request

logger = logging.getLogger(__name__)


@receiver(signals.revision_proposed)
def judge_a_proposal(sender, revision, **kwargs) -> None:
    try:
        revisions_judge_request(revision_ids=[revision.pk])
    except Exception:  # noqa: BLE001
        logger.exception("Could not ask the judge about revision %s.", revision.pk)


@receiver(signals.revisions_imported)
def judge_an_import(sender, project_id: int, revision_ids: list[int], **kwargs) -> None:
    try:
        revisions_judge_request(revision_ids=revision_ids)
    except Exception:  # noqa: BLE001
        logger.exception("Could not ask the judge about %d imported revisions.", len(revision_ids))
