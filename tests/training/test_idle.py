"""Idle detection from a frozen clock and the Redis traffic counters, readiness, and the beat
task's decision to start or resume a run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from base import counters
from base.errors import DomainError
from incidents.models import Trajectory
from tests import factories
from training.demo import demo_trajectories_load
from training.policy import services as policy_services
from training.policy.models import IdleWindowPolicy
from training.runs import execute as runs_execute
from training.runs import services as run_services
from training.runs.models import PauseReason, RunStatus, TrainingRun
from training.runs.tasks import check_idle_windows

pytestmark = pytest.mark.django_db

# Wednesday 2026-11-25 02:30 in Berlin (CET, UTC+1) is 01:30 UTC.
WED_0230_BERLIN = datetime(2026, 11, 25, 1, 30, tzinfo=UTC)
WED_1200_BERLIN = datetime(2026, 11, 25, 11, 0, tzinfo=UTC)
SAT_0230_BERLIN = datetime(2026, 11, 28, 1, 30, tzinfo=UTC)

ICAL = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//test//EN
BEGIN:VEVENT
UID:freeze-1
SUMMARY:Release freeze
DTSTART:20261125T130000Z
DTEND:20261125T150000Z
END:VEVENT
BEGIN:VEVENT
UID:sunday-quiet
SUMMARY:Sunday quiet hours
DTSTART:20261101T080000Z
DTEND:20261101T100000Z
RRULE:FREQ=WEEKLY;BYDAY=SU
END:VEVENT
END:VCALENDAR
"""


def _policy(project, **fields) -> IdleWindowPolicy:
    defaults = {
        "mode": "calendar",
        "timezone": "Europe/Berlin",
        "weekly_windows": "mon-fri 01:00-05:00",
    }
    defaults.update(fields)
    return policy_services.idle_policy_update(project=project, **defaults)


def _run(project, status: str, **fields) -> TrainingRun:
    """A run row in ``status``, written directly (no service puts a run there at once)."""
    return TrainingRun.objects.create(
        project=project, backend="local", base_model="m", status=status, **fields
    )


def _traffic(project, at: datetime, per_minute: list[int]) -> None:
    """``per_minute[-1]`` requests in the minute of ``at``, earlier entries in earlier minutes."""
    for back, count in enumerate(reversed(per_minute)):
        moment = at.timestamp() - 60 * back
        for _ in range(count):
            counters.count_traffic(project_id=project.pk, now=moment)


def test_weekly_window_in_the_projects_time_zone_makes_it_idle(project):
    _policy(project)

    status = policy_services.project_idle_status(project=project, now=WED_0230_BERLIN)

    assert status.idle is True
    assert status.in_window is True
    assert status.window_label == "mon-fri 01:00-05:00"
    assert status.window_ends_at == datetime(2026, 11, 25, 4, 0, tzinfo=UTC)
    assert any("Inside the quiet window" in r for r in status.reasons)


def test_outside_the_window_it_is_busy_and_says_when_the_next_one_opens(project):
    _policy(project)

    status = policy_services.project_idle_status(project=project, now=WED_1200_BERLIN)

    assert status.idle is False
    assert status.next_window_at == datetime(2026, 11, 26, 0, 0, tzinfo=UTC)  # Thu 01:00 CET
    assert "Outside every calendar window." in status.reasons


def test_the_weekend_is_outside_a_weekday_window_and_the_next_opens_monday(project):
    _policy(project)

    status = policy_services.project_idle_status(project=project, now=SAT_0230_BERLIN)

    assert status.idle is False
    assert status.next_window_at == datetime(2026, 11, 30, 0, 0, tzinfo=UTC)


def test_a_window_past_midnight_spans_into_the_next_day(project):
    _policy(project, weekly_windows="tue 23:00-03:00")

    status = policy_services.project_idle_status(project=project, now=WED_0230_BERLIN)

    assert status.idle is True


def test_icalendar_events_mark_quiet_windows_including_recurring_ones(project):
    _policy(project, weekly_windows="", ical_text=ICAL)

    during_freeze = policy_services.project_idle_status(
        project=project, now=datetime(2026, 11, 25, 14, 0, tzinfo=UTC)
    )
    sunday = policy_services.project_idle_status(
        project=project, now=datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    )
    monday = policy_services.project_idle_status(
        project=project, now=datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    )

    assert during_freeze.idle and during_freeze.window_label == "Release freeze"
    assert sunday.idle and sunday.window_label == "Sunday quiet hours"
    assert not monday.idle
    assert monday.next_window_at == datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


def test_quiet_traffic_for_n_minutes_is_idle_and_a_burst_is_not(project):
    _policy(project, mode="traffic", traffic_threshold_rpm=5, traffic_idle_minutes=10)
    now = WED_1200_BERLIN + timedelta(seconds=30)
    _traffic(project, now, [4, 3, 0, 1, 2, 0, 0, 4, 1, 0, 2])

    quiet = policy_services.project_idle_status(project=project, now=now)
    _traffic(project, now - timedelta(minutes=6), [5])
    busy = policy_services.project_idle_status(project=project, now=now)
    # Eleven minutes later the burst has left the window.
    later = policy_services.project_idle_status(project=project, now=now + timedelta(minutes=11))

    assert quiet.idle is True and quiet.traffic_quiet is True
    assert len(quiet.traffic) == 11
    assert busy.idle is False
    assert any("reached 7 requests/min" in r for r in busy.reasons)
    assert later.idle is True


def test_both_mode_needs_the_window_and_quiet_traffic(project):
    _policy(project, mode="both", traffic_threshold_rpm=3, traffic_idle_minutes=5)
    _traffic(project, WED_0230_BERLIN, [0, 0, 10])

    assert policy_services.project_idle_status(project=project, now=WED_0230_BERLIN).idle is False
    assert (
        policy_services.project_idle_status(
            project=project, now=WED_0230_BERLIN + timedelta(minutes=10)
        ).idle
        is True
    )


def test_counters_are_per_project(project, other_project):
    _policy(project, mode="traffic", traffic_threshold_rpm=1, traffic_idle_minutes=5)
    _traffic(other_project, WED_1200_BERLIN, [50])

    assert policy_services.project_idle_status(project=project, now=WED_1200_BERLIN).idle is True


def test_bad_window_text_is_refused_naming_the_field_and_changes_nothing(project):
    _policy(project)

    with pytest.raises(DomainError) as exc:
        policy_services.idle_policy_update(project=project, weekly_windows="someday 25:00-26:00")

    assert exc.value.field == "weekly_windows"
    assert IdleWindowPolicy.objects.get(project=project).weekly_windows == [
        {"days": [0, 1, 2, 3, 4], "start": "01:00", "end": "05:00"}
    ]


def test_a_viewer_may_not_change_the_policy(project):
    viewer = factories.make_member(project, "viewer")

    with pytest.raises(DomainError):
        policy_services.idle_policy_update(project=project, actor=viewer, mode="traffic")

    assert not IdleWindowPolicy.objects.filter(project=project).exists()


def test_readiness_counts_new_usable_samples_and_the_daily_budget(project):
    _policy(project, min_new_samples=100, max_runs_per_day=1)
    demo_trajectories_load(project, count=120)
    usable = Trajectory.objects.filter(project=project, reward__gt=0).count()
    corrected = (
        Trajectory.objects.filter(project=project, reward__lte=0)
        .exclude(corrected_answer="")
        .count()
    )

    readiness = run_services.project_training_readiness(project=project)

    assert readiness.new_samples == usable + corrected
    assert readiness.ready is (usable + corrected >= 100)
    policy_services.idle_policy_update(project=project, min_new_samples=10)
    _run(project, RunStatus.FAILED, step=3)  # failed after training a while: it counts
    assert run_services.project_training_readiness(project=project).ready is False
    policy_services.idle_policy_update(project=project, max_runs_per_day=2)
    assert run_services.project_training_readiness(project=project).ready is True


def test_the_beat_task_starts_a_run_when_idle_and_ready_and_not_otherwise(
    project, django_capture_on_commit_callbacks, monkeypatch
):
    _policy(project, mode="traffic", traffic_threshold_rpm=1000, min_new_samples=10)
    demo_trajectories_load(project, count=60)
    executed: list[int] = []
    monkeypatch.setattr(
        "training.runs.tasks.training_run_execute.delay", lambda run_id: executed.append(run_id)
    )

    with django_capture_on_commit_callbacks(execute=True):
        check_idle_windows()
    with django_capture_on_commit_callbacks(execute=True):
        check_idle_windows()  # a run is in flight: nothing new

    run = TrainingRun.objects.get(project=project)
    assert run.status == RunStatus.QUEUED
    assert run.trigger == "schedule"
    assert executed == [run.pk]


def test_the_beat_task_leaves_a_project_alone_while_it_is_busy(project, monkeypatch):
    _policy(project, mode="calendar", min_new_samples=1)
    demo_trajectories_load(project, count=30)
    for module in (policy_services, run_services, runs_execute):
        monkeypatch.setattr(module, "_now", lambda: WED_1200_BERLIN)

    assert runs_execute.training_schedule_tick(project=project, now=WED_1200_BERLIN) is None
    assert not TrainingRun.objects.filter(project=project).exists()


def test_the_beat_task_resumes_a_run_paused_by_the_window_but_not_one_paused_by_a_person(
    project, django_capture_on_commit_callbacks, monkeypatch
):
    _policy(project, mode="traffic", traffic_threshold_rpm=1000)
    monkeypatch.setattr("training.runs.tasks.training_run_execute.delay", lambda run_id: None)
    run = _run(project, RunStatus.PAUSED, pause_reason=PauseReason.REQUESTED)

    assert runs_execute.training_schedule_tick(project=project) is None
    TrainingRun.objects.filter(pk=run.pk).update(pause_reason=PauseReason.NOT_IDLE)
    with django_capture_on_commit_callbacks(execute=True):
        resumed = runs_execute.training_schedule_tick(project=project)

    assert resumed.pk == run.pk
    run.refresh_from_db()
    assert run.status == RunStatus.QUEUED


def test_a_run_without_heartbeat_is_marked_stale_and_resumable(project):
    _policy(project, stale_after_minutes=10)
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    stale = _run(
        project,
        RunStatus.TRAINING,
        heartbeat_at=now - timedelta(minutes=11),
        state_ref="/tmp/ckpt",
        state_step=4,
        step=6,
    )
    other = factories.make_project(name="fresh")
    fresh = _run(other, RunStatus.TRAINING, heartbeat_at=now - timedelta(minutes=3))

    marked = run_services.training_runs_mark_stale(now=now)

    assert marked == [stale.pk]
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == RunStatus.PAUSED
    assert stale.pause_reason == PauseReason.STALE
    assert "marked stale" in stale.log
    assert fresh.status == RunStatus.TRAINING
