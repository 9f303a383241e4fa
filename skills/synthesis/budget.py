"""A project's daily LLM token budget: every call MetaClaw makes to the project's LLM (the fast
loop's syntheses and the judge's readings) adds its tokens to the project's day
(``LlmUsage``), and neither asks once the day's budget is spent. What each does then is its
own: a group waits in BUDGET (``skills.synthesis.services``), a judge's reading waits in
PENDING (``skills.judge.services``); their sweeps try again."""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import F, Sum
from django.utils import timezone

from base.models import Project
from skills.synthesis import llm
from skills.synthesis.models import LlmUsage


def budget_exceeded(project: Project) -> bool:
    """The project set a daily budget and today's calls have spent it."""
    budget = project.llm_daily_token_budget
    if not budget:
        return False
    used = LlmUsage.objects.filter(project=project, day=timezone.localdate()).aggregate(
        total=Sum(F("tokens_in") + F("tokens_out"))
    )["total"]
    return (used or 0) >= budget


def usage_record(project: Project, usage: llm.Usage) -> None:
    """Add one call's tokens to the project's day, committed at once when no transaction is
    open (spent tokens count even if what asked fails later). Concurrent workers add up
    correctly: the update adds in the database, and the first call of a day that loses the race
    to create the row updates the winner's."""
    day = timezone.localdate()
    added = {
        "calls": F("calls") + 1,
        "tokens_in": F("tokens_in") + usage.tokens_in,
        "tokens_out": F("tokens_out") + usage.tokens_out,
    }
    if LlmUsage.objects.filter(project=project, day=day).update(**added):
        return
    try:
        with transaction.atomic():
            LlmUsage.objects.create(
                project=project,
                day=day,
                calls=1,
                tokens_in=usage.tokens_in,
                tokens_out=usage.tokens_out,
            )
    except IntegrityError:
        LlmUsage.objects.filter(project=project, day=day).update(**added)
