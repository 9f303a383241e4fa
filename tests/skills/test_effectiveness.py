"""Effectiveness on live traffic, through the public API and pages.

Traffic is deterministic: a fake agent reports its turns (``POST /api/v1/trajectories/batch``)
and its failures (``POST /api/v1/incidents/batch``) with chosen ``occurred_at`` timestamps, and
fails at a rate that depends on whether the skill was in the policy it ran with, and on what the
skill does (fixes the failure, does nothing, or fixes it and breaks something else). The skill
goes live through the API; its release is then dated back eight days so that a whole week of
traffic lies on each side of it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from base.models import AuditEvent, Project, Role
from incidents.models import GroupStatus, IncidentGroup
from skills.approvals.models import Notification, NotificationKind
from skills.effectiveness import tasks
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import Release, ReleaseKind
from tests import factories

pytestmark = pytest.mark.django_db

TURNS_PER_DAY = 20
FAILURES_PER_DAY = 2  # without the skill: 100 incidents per 1,000 turns
DATES_ERROR = {"type": "ToolArgumentError", "message": "search_orders: invalid value for 'since'"}
OTHER_ERROR = {"type": "RefundError", "message": "issue_refund: amount exceeds the order total"}


class FakeAgent:
    """An agent behind MetaClaw. Without the skill it fails ``FAILURES_PER_DAY`` times a day
    with the date error; with it, ``effect`` decides: "fixes" (no more date errors), "nothing"
    (the same rate) or "harms" (fixes the dates, and refunds start failing as often)."""

    def __init__(self, project: Project, effect: str) -> None:
        self.project = project
        self.effect = effect
        self.client = Client(HTTP_AUTHORIZATION=f"Bearer {factories.make_key(project, ['ingest'])}")
        self.sent = 0

    def run_day(self, day_start, *, with_skill: bool, policy_version: int) -> None:
        turns = []
        for i in range(TURNS_PER_DAY):
            self.sent += 1
            turns.append(
                {
                    "id": f"turn-{self.sent}",
                    "agent": {"name": "support-bot"},
                    "policy_version": policy_version,
                    "messages": [{"role": "user", "content": f"Where is order {self.sent}?"}],
                    "occurred_at": (day_start + timedelta(minutes=30 * i)).isoformat(),
                }
            )
        answer = self.client.post(
            "/api/v1/trajectories/batch", {"items": turns}, content_type="application/json"
        )
        assert answer.status_code == 207, answer.content
        errors = []
        if not with_skill or self.effect == "nothing":
            errors += [DATES_ERROR] * FAILURES_PER_DAY
        if with_skill and self.effect == "harms":
            errors += [OTHER_ERROR] * FAILURES_PER_DAY
        incidents = []
        for i, error in enumerate(errors):
            self.sent += 1
            incidents.append(
                factories.incident_payload(
                    f"inc-{self.sent}",
                    error=error,
                    policy_version=policy_version,
                    occurred_at=(day_start + timedelta(minutes=30 * i + 7)).isoformat(),
                )
            )
        if incidents:
            answer = self.client.post(
                "/api/v1/incidents/batch", {"items": incidents}, content_type="application/json"
            )
            assert answer.status_code == 207, answer.content


def _admin(project: Project) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {factories.make_key(project, ['admin'])}")


def _live_skill(project: Project, effect: str, *, after_days: int = 7):
    """A week of traffic without the skill, the skill approved through the API (its release
    dated back to eight days ago), then ``after_days`` of traffic with it. Returns the revision,
    the group it was made for and an admin client."""
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    live_at = now - timedelta(days=8)
    agent = FakeAgent(project, effect)
    for day in range(7, 0, -1):
        agent.run_day(live_at - timedelta(days=day), with_skill=False, policy_version=1)
    group = IncidentGroup.objects.get(project=project, error_type="ToolArgumentError")
    revision = SkillRevision.objects.filter(source_groups=group).first()
    if revision is None:  # the fast loop had not drafted one
        revision = factories.make_revision(project, source_groups=[group])
    admin = _admin(project)
    answer = admin.post(
        f"/api/v1/skills/revisions/{revision.pk}/approve", {}, content_type="application/json"
    )
    assert answer.status_code == 200, answer.content
    Release.objects.filter(project=project, kind=ReleaseKind.APPROVAL).update(created_at=live_at)
    SkillRevision.objects.filter(pk=revision.pk).update(status_changed_at=live_at)
    version = revision.policy_versions.get().number
    for day in range(after_days):
        agent.run_day(live_at + timedelta(days=day), with_skill=True, policy_version=version)
    return revision, group, admin


def _effectiveness(admin: Client, revision: SkillRevision) -> dict:
    answer = admin.get(f"/api/v1/skills/revisions/{revision.pk}/effectiveness")
    assert answer.status_code == 200, answer.content
    return answer.json()


def test_a_skill_that_fixes_its_failure_shows_improved_and_is_not_flagged(effectiveness_thresholds):
    project = factories.make_project()
    project.notify_emails = "team@example.com"
    project.save(update_fields=["notify_emails"])
    revision, group, admin = _live_skill(project, "fixes")

    tasks.check_effectiveness()

    body = _effectiveness(admin, revision)
    assert body["verdict"] == "improved"
    target = body["target"]
    assert (target["incidents_before"], target["turns_before"]) == (14, 140)
    assert (target["incidents_after"], target["turns_after"]) == (0, 140)
    assert target["rate_before"] == 100.0 and target["rate_after"] == 0.0
    assert target["ratio_high"] < 1
    assert body["ineffective"] is False and body["harmful"] is False
    assert body["flagged_at"] is None
    assert len(body["series"]) >= 14 and body["marks"]
    revision.refresh_from_db()
    assert revision.effectiveness["verdict"] == "improved"
    assert revision.effectiveness_flagged_at is None
    assert revision.status == RevisionStatus.APPROVED
    group.refresh_from_db()
    assert group.status != GroupStatus.REGRESSED
    assert not Notification.objects.filter(kind=NotificationKind.EFFECTIVENESS_FLAG).exists()
    assert not AuditEvent.objects.filter(action="skill_revision.effectiveness_flagged").exists()


def test_a_skill_that_changes_nothing_is_flagged_back_to_review_and_its_group_regressed(
    effectiveness_thresholds, django_capture_on_commit_callbacks
):
    project = factories.make_project()
    project.notify_emails = "team@example.com"
    project.save(update_fields=["notify_emails"])
    revision, group, admin = _live_skill(project, "nothing")

    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.check_effectiveness() == 1
    assert tasks.check_effectiveness() == 0  # flagged once

    body = _effectiveness(admin, revision)
    assert body["verdict"] == "no_change"
    assert body["ineffective"] is True and body["harmful"] is False
    assert body["target"]["ratio_low"] < 1 < body["target"]["ratio_high"]
    assert body["flagged_at"] is not None
    assert "did not fall" in body["flag_reason"] and "100 → 100" in body["flag_reason"]
    revision.refresh_from_db()
    assert revision.effectiveness_flagged_at is not None
    assert revision.effectiveness["target"]["incidents_after"] == 14
    group.refresh_from_db()
    assert group.status == GroupStatus.REGRESSED
    assert AuditEvent.objects.filter(action="skill_revision.effectiveness_flagged").count() == 1
    flag = Notification.objects.get(kind=NotificationKind.EFFECTIVENESS_FLAG)
    assert flag.revision_id == revision.pk and flag.recipient == "team@example.com"
    assert any("back in the review queue" in message.body for message in mail.outbox)

    reviewer = factories.make_member(project, Role.REVIEWER)
    page = Client()
    page.force_login(reviewer)
    queue = page.get(f"/p/{project.slug}/review/")
    assert queue.status_code == 200
    assert revision.name in queue.content.decode()
    assert "live, did not work" in queue.content.decode()
    panel = page.get(
        f"/p/{project.slug}/review/{revision.pk}/effectiveness/", HTTP_HX_REQUEST="true"
    )
    assert panel.status_code == 200
    html = panel.content.decode()
    assert "No change" in html and "Back in review" in html and "eff-activation" in html


def test_a_skill_whose_activation_coincides_with_a_rise_in_other_groups_is_flagged_harmful(
    effectiveness_thresholds,
):
    project = factories.make_project()
    revision, group, admin = _live_skill(project, "harms")

    assert tasks.check_effectiveness() == 1

    body = _effectiveness(admin, revision)
    assert body["verdict"] == "improved"
    assert body["harmful"] is True and body["ineffective"] is False
    assert body["others"]["verdict"] == "worse"
    assert (body["others"]["incidents_before"], body["others"]["incidents_after"]) == (0, 14)
    assert "Other groups' rate rose" in body["flag_reason"]
    group.refresh_from_db()
    assert group.status != GroupStatus.REGRESSED  # its own group did improve


def test_too_little_traffic_says_so_and_flags_nothing(effectiveness_thresholds, settings):
    settings.METACLAW = {**settings.METACLAW, "EFFECTIVENESS_MIN_TURNS": 1000}
    project = factories.make_project()
    revision, _group, admin = _live_skill(project, "nothing", after_days=2)

    assert tasks.check_effectiveness() == 0

    body = _effectiveness(admin, revision)
    assert body["verdict"] == "too_thin"
    assert body["ineffective"] is False
    assert body["target"]["turns_after"] == 40
    revision.refresh_from_db()
    assert revision.effectiveness["verdict"] == "too_thin"
    assert revision.effectiveness_flagged_at is None


def test_version_and_group_effectiveness_in_the_api_and_on_their_pages(effectiveness_thresholds):
    project = factories.make_project()
    revision, group, admin = _live_skill(project, "fixes")
    number = revision.policy_versions.get().number

    version = admin.get(f"/api/v1/versions/{number}/effectiveness")
    assert version.status_code == 200
    assert version.json()["verdict"] == "improved"
    assert version.json()["group_ids"] == [group.pk]
    reader = Client(HTTP_AUTHORIZATION=f"Bearer {factories.make_key(project, ['ingest'])}")
    by_group = reader.get(f"/api/v1/groups/{group.pk}/effectiveness")
    assert by_group.status_code == 200
    assert by_group.json()["verdict"] == "improved"
    assert [r["id"] for r in by_group.json()["revisions"]] == [revision.pk]
    assert admin.get("/api/v1/versions/1/effectiveness").json()["verdict"] == "too_thin"

    viewer = factories.make_member(project, Role.VIEWER)
    page = Client()
    page.force_login(viewer)
    # The group page loads this panel by htmx (tests/browser/test_effectiveness_chart.py).
    panel = page.get(f"/p/{project.slug}/groups/{group.pk}/effectiveness/")
    assert panel.status_code == 200 and "Improved" in panel.content.decode()
    assert page.get(f"/p/{project.slug}/versions/{number}/effectiveness/").status_code == 200


def test_effectiveness_is_refused_across_projects(effectiveness_thresholds):
    project = factories.make_project()
    revision, group, _admin_client = _live_skill(project, "fixes", after_days=1)
    stranger = _admin(factories.make_project())
    assert stranger.get(f"/api/v1/skills/revisions/{revision.pk}/effectiveness").status_code == 404
    assert stranger.get(f"/api/v1/groups/{group.pk}/effectiveness").status_code == 404
