"""Notifications to Slack, a signed webhook and e-mail, Slack's interactivity endpoint and the
integration settings, against loopback servers that play Slack and a webhook receiver.

It is long (over 500 lines) because every channel's tests share the fixtures and helpers at its
top; a split by channel would first move those to a conftest."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlencode, urlsplit

import pytest
from django.core import mail

from base.models import AuditEvent, Membership, Project
from skills.approvals.models import (
    ApprovalRequest,
    InteractionStatus,
    Notification,
    NotificationStatus,
    SlackInteraction,
)
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion, VersionStatus
from skills.versions.services import (
    policy_version_create_candidate,
    skill_revision_approve,
)
from tests import factories
from tests.fakes.slack_server import SlackFake, slack_signed_headers

pytestmark = pytest.mark.django_db

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
INTERACTIONS = "/integrations/slack/interactions"


@pytest.fixture
def slack():
    with SlackFake(webhook_secret="whsec-test") as fake:
        yield fake


def configure(project: Project, **fields) -> Project:
    Project.objects.filter(pk=project.pk).update(**fields)
    project.refresh_from_db()
    return project


@pytest.fixture
def slack_project(project, slack):
    return configure(
        project, slack_webhook_url=slack.webhook_url, slack_signing_secret=SIGNING_SECRET
    )


@pytest.fixture
def rita(project):
    user = factories.make_member(project, "reviewer", "rita")
    Membership.objects.filter(user=user).update(slack_user_id="U0RITA")
    return user


def propose(project: Project, capture) -> SkillRevision:
    """Propose a revision and deliver the notifications its commit enqueues."""
    with capture(execute=True):
        return factories.make_llm_revision(project)


def buttons(message: dict) -> dict[str, dict]:
    actions = next(b for b in message["blocks"] if b["type"] == "actions")
    return {b["text"]["text"]: b for b in actions["elements"]}


def propose_on_slack(
    slack: SlackFake, project: Project, capture, label: str = "Approve"
) -> tuple[SkillRevision, dict]:
    """Propose a revision; it, and the button ``label`` of the message Slack was sent about it."""
    revision = propose(project, capture)
    return revision, buttons(slack.of("webhook")[0].json)[label]


def assert_still_proposed(revision: SkillRevision) -> None:
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.PROPOSED


def propose_to_failing_slack(
    slack: SlackFake, project: Project, capture, *, status: int, times: int
) -> Notification:
    """Propose a revision while Slack's webhook answers ``status`` the next ``times`` times; the
    Slack notification, as delivery left it."""
    slack.fail_next("webhook", status=status, times=times)
    propose(project, capture)
    return Notification.objects.get(channel="slack")


def configure_slack_and_webhook(project: Project, slack: SlackFake, **fields) -> Project:
    """``project`` sending to both loopback receivers: Slack's webhook and the signed webhook."""
    return configure(
        project,
        slack_webhook_url=slack.webhook_url,
        webhook_url=slack.hook_url,
        webhook_secret="whsec-test",
        **fields,
    )


def click(
    client,
    slack: SlackFake,
    button: dict,
    *,
    user: str = "U0RITA",
    name: str = "r1",
    action_ts: str = "1700000000.000100",
    secret: str = SIGNING_SECRET,
    **sign,
) -> tuple:
    """POST a block_actions payload as Slack does: form-encoded ``payload`` JSON, signed."""
    payload = {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "team_id": "T0TEAM"},
        "team": {"id": "T0TEAM", "domain": "acme"},
        "api_app_id": "A0APP",
        "container": {"type": "message", "message_ts": "1700000000.000001", "channel_id": "C0"},
        "trigger_id": "1.2.3",
        "channel": {"id": "C0", "name": "reviews"},
        "response_url": slack.response_url(name),
        "actions": [
            {
                "type": "button",
                "action_id": button["action_id"],
                "block_id": "metaclaw",
                "text": button["text"],
                "value": button.get("value", ""),
                "action_ts": action_ts,
            }
        ],
    }
    body = urlencode({"payload": json.dumps(payload)})
    headers = slack_signed_headers(secret, body, **sign)
    response = client.post(
        INTERACTIONS, data=body, content_type="application/x-www-form-urlencoded", **headers
    )
    return response, body


# --- Slack messages -----------------------------------------------------------------------


def test_a_proposed_revision_is_posted_to_slack_with_approve_reject_and_open_buttons(
    django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision = propose(slack_project, django_capture_on_commit_callbacks)

    [post] = slack.of("webhook")
    message = post.json
    assert "Skill proposal: Normalise date arguments" in message["text"]
    assert message["blocks"][0] == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Skill proposal: Normalise date arguments"},
    }
    assert "ISO 8601" in json.dumps(message["blocks"])
    assert "Evidence: 0 incident(s)" in json.dumps(message["blocks"])
    found = buttons(message)
    assert set(found) == {"Approve", "Reject", "Open"}
    assert found["Approve"]["action_id"] == "metaclaw_approve"
    assert found["Approve"]["style"] == "primary"
    assert json.loads(found["Approve"]["value"])["id"] == revision.pk
    assert found["Reject"]["style"] == "danger" and "confirm" in found["Reject"]
    assert re.search(r"/a/[A-Za-z0-9_\-]{40,}$", found["Open"]["url"])
    notification = Notification.objects.get(channel="slack")
    assert notification.status == NotificationStatus.SENT
    assert notification.attempts == 1 and notification.sent_at is not None
    assert notification.revision == revision
    # The one-time links are not kept at rest once delivered.
    assert "/a/[sent]" in json.dumps(notification.payload)
    channel_links = ApprovalRequest.objects.filter(revision=revision, addressee=None)
    assert {r.action for r in channel_links} == {"approve_revision", "reject_revision"}


def test_without_a_signing_secret_the_slack_buttons_are_signed_links_that_work(
    client, django_capture_on_commit_callbacks, slack, project, rita
):
    project = configure(project, slack_webhook_url=slack.webhook_url)
    revision = propose(project, django_capture_on_commit_callbacks)
    found = buttons(slack.of("webhook")[0].json)
    approve = urlsplit(found["Approve"]["url"]).path
    assert approve.startswith("/a/") and "value" not in found["Approve"]

    client.force_login(rita)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.get(approve).status_code == 200
        assert client.post(approve).status_code == 200

    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED and revision.decided_by == rita
    # The channel sees who decided: a follow-up on the webhook (no response_url was given).
    follow_up = slack.of("webhook")[-1].json
    assert "was approved by rita at" in follow_up["text"]
    assert not any(b["type"] == "actions" for b in follow_up["blocks"])


def test_slack_failures_are_retried_and_a_final_failure_is_recorded_on_the_notification(
    django_capture_on_commit_callbacks, slack, slack_project
):
    notification = propose_to_failing_slack(
        slack, slack_project, django_capture_on_commit_callbacks, status=500, times=10
    )

    assert len(slack.of("webhook")) == 5
    assert notification.status == NotificationStatus.FAILED
    assert notification.attempts == 5
    assert "answered 500" in notification.last_error
    # The receiver's response body is not stored (nor shown): the status line only.
    assert "server_error" not in notification.last_error
    assert AuditEvent.objects.filter(
        action="notification.failed", object_id=str(notification.pk)
    ).exists()


@pytest.mark.parametrize(
    ("status", "times", "ends", "attempts", "last_error_pattern"),
    [
        pytest.param(503, 2, NotificationStatus.SENT, 3, "", id="transient-retried-until-sent"),
        pytest.param(
            404, 1, NotificationStatus.FAILED, 1, ".*answered 404.*", id="removed-fails-at-once"
        ),
    ],
)
def test_a_slack_failure_is_retried_while_it_may_pass_and_only_then(
    django_capture_on_commit_callbacks,
    slack,
    slack_project,
    status,
    times,
    ends,
    attempts,
    last_error_pattern,
):
    """A transient failure (503) is retried until the notification is delivered; a removed
    webhook (404) fails at once, without retrying."""
    notification = propose_to_failing_slack(
        slack, slack_project, django_capture_on_commit_callbacks, status=status, times=times
    )

    assert notification.status == ends
    assert notification.attempts == attempts
    assert re.fullmatch(last_error_pattern, notification.last_error, re.DOTALL)


def test_a_notification_whose_worker_died_while_sending_is_sent_again_by_the_sweep(
    django_capture_on_commit_callbacks, slack, slack_project
):
    from datetime import timedelta

    from django.utils import timezone

    from skills.approvals.tasks import sweep_pending_notifications

    revision = propose(slack_project, django_capture_on_commit_callbacks)
    notification = Notification.objects.get(revision=revision, channel="slack")
    # A worker claimed it and died mid-send: SENDING, and nobody will come back to it.
    long_ago = timezone.now() - timedelta(hours=1)
    Notification.objects.filter(pk=notification.pk).update(
        status=NotificationStatus.SENDING, claimed_at=long_ago, sent_at=None
    )
    posts_before = len(slack.of("webhook"))

    assert sweep_pending_notifications() == 1

    notification.refresh_from_db()
    assert notification.status == NotificationStatus.SENT
    assert len(slack.of("webhook")) == posts_before + 1
    # A fresh SENDING row (a live worker) is left alone.
    Notification.objects.filter(pk=notification.pk).update(
        status=NotificationStatus.SENDING, claimed_at=timezone.now()
    )
    assert sweep_pending_notifications() == 0


# --- Webhook and e-mail ---------------------------------------------------------------------


def test_webhook_deliveries_carry_an_hmac_signature_the_receiver_verifies(
    django_capture_on_commit_callbacks, slack, project, rita
):
    project = configure(project, webhook_url=slack.hook_url, webhook_secret="whsec-test")

    revision = propose(project, django_capture_on_commit_callbacks)

    [post] = slack.of("hook")
    assert post.verified is True
    assert post.headers["X-MetaClaw-Signature"].startswith("sha256=")
    body = post.json
    assert body["event"] == "approval.requested"
    assert body["object"]["id"] == revision.pk
    assert body["object"]["skill"] == "date-args"
    assert set(body["links"]) == {"approve", "reject"}
    assert Notification.objects.get(channel="webhook").status == NotificationStatus.SENT


def test_a_webhook_signed_with_the_wrong_secret_is_refused_and_recorded_as_failed(
    django_capture_on_commit_callbacks, slack, project
):
    project = configure(project, webhook_url=slack.hook_url, webhook_secret="not-the-secret")

    propose(project, django_capture_on_commit_callbacks)

    [post] = slack.of("hook")
    assert post.verified is False
    notification = Notification.objects.get(channel="webhook")
    assert notification.status == NotificationStatus.FAILED
    assert "answered 401" in notification.last_error
    assert "bad signature" not in notification.last_error


def test_reviewers_get_personal_links_by_email_that_act_without_a_login(
    client, django_capture_on_commit_callbacks, project
):
    reviewer = factories.make_user("rex", email="rex@example.com")
    from base.services import membership_set

    membership_set(project=project, user=reviewer, role="reviewer")
    factories.make_user("nobody", email="nobody@example.com")  # not a member
    project = configure(project, notify_emails="team@example.com")

    revision = propose(project, django_capture_on_commit_callbacks)

    by_address = {m.to[0]: m for m in mail.outbox}
    assert set(by_address) == {"rex@example.com", "team@example.com"}
    personal = by_address["rex@example.com"].body
    assert "Convert relative dates" in personal
    approve = re.search(r"Approve: http://[^/]+(/a/\S+)", personal).group(1)
    assert ApprovalRequest.objects.filter(addressee=reviewer, channel="email").count() == 2

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(approve)

    assert response.status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED and revision.decided_by == reviewer


# --- Slack interactivity ----------------------------------------------------------------------


def test_a_signed_click_from_a_linked_reviewer_approves_and_updates_the_message(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)

    with django_capture_on_commit_callbacks(execute=True):
        response, _ = click(client, slack, approve)

    assert response.status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    assert revision.decided_by == rita
    interaction = SlackInteraction.objects.get()
    assert interaction.status == InteractionStatus.DONE and interaction.result == "approved"
    [update] = slack.of("response")
    assert update.path == "/actions/r1"
    assert update.json["replace_original"] is True
    assert "was approved by rita at" in update.json["text"]
    assert len(slack.of("webhook")) == 1  # updated in place, no follow-up post


def test_slack_retries_and_duplicate_deliveries_do_not_act_twice(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, approve)
    versions = PolicyVersion.objects.count()

    with django_capture_on_commit_callbacks(execute=True):
        retried, _ = click(client, slack, approve, retry_num=1)
        duplicate, _ = click(client, slack, approve)

    assert retried.status_code == duplicate.status_code == 200
    interaction = SlackInteraction.objects.get()
    assert interaction.deliveries == 3
    assert PolicyVersion.objects.count() == versions
    assert len(slack.of("response")) == 1

    # A second, distinct click on the old message is answered, privately, with who decided.
    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, approve, action_ts="1700000099.000200", name="r2")
    second = SlackInteraction.objects.exclude(pk=interaction.pk).get()
    assert second.status == InteractionStatus.REFUSED
    reply = slack.of("response")[-1].json
    assert reply["response_type"] == "ephemeral"
    assert "was already approved by rita" in reply["text"]
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED


def test_the_endpoint_acknowledges_before_the_work_is_done(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)

    started = time.monotonic()
    response, _ = click(client, slack, approve)  # the enqueue waits for commit, which never comes

    assert response.status_code == 200 and response.content == b""
    assert time.monotonic() - started < 3
    assert SlackInteraction.objects.get().status == InteractionStatus.RECEIVED
    assert_still_proposed(revision)


def test_unsigned_wrongly_signed_and_stale_interactions_are_refused(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)

    with django_capture_on_commit_callbacks(execute=True):
        wrong, body = click(client, slack, approve, secret="someone-elses-secret")
        stale, _ = click(client, slack, approve, timestamp=int(time.time()) - 301)
        unsigned = client.post(
            INTERACTIONS, data=body, content_type="application/x-www-form-urlencoded"
        )

    assert wrong.status_code == stale.status_code == unsigned.status_code == 401
    assert not SlackInteraction.objects.exists()
    assert_still_proposed(revision)


def test_the_site_wide_signing_secret_is_used_when_the_project_has_none(
    client, django_capture_on_commit_callbacks, slack, project, rita, settings
):
    settings.SLACK_SIGNING_SECRET = "site-wide-secret"
    project = configure(project, slack_webhook_url=slack.webhook_url)
    revision, approve = propose_on_slack(slack, project, django_capture_on_commit_callbacks)
    assert "value" in approve  # interactive, because a secret is configured site-wide

    with django_capture_on_commit_callbacks(execute=True):
        response, _ = click(client, slack, approve, secret="site-wide-secret")

    assert response.status_code == 200
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED


def test_an_unlinked_slack_user_is_sent_a_link_to_connect_their_account(
    client, django_capture_on_commit_callbacks, slack, slack_project
):
    newbie = factories.make_member(slack_project, "reviewer", "nina")
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)

    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, approve, user="U0NINA")

    reply = slack.of("response")[-1].json
    assert reply["response_type"] == "ephemeral"
    link = urlsplit(re.search(r"http://\S+", reply["text"]).group(0)).path
    assert_still_proposed(revision)

    client.force_login(newbie)
    assert "U0NINA" in client.get(link).content.decode()
    assert client.post(link).status_code == 200
    assert Membership.objects.get(user=newbie).slack_user_id == "U0NINA"

    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, approve, user="U0NINA", action_ts="1700000100.000300", name="r2")
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED and revision.decided_by == newbie


def test_a_forged_account_link_is_refused(client, slack_project):
    client.force_login(factories.make_member(slack_project, "reviewer", "nina"))

    response = client.post("/integrations/slack/link/eyJwIjoxfQ:forged:signature")

    assert response.status_code == 400
    assert not Membership.objects.exclude(slack_user_id="").exists()


def test_a_linked_member_without_the_role_cannot_decide_from_slack(
    client, django_capture_on_commit_callbacks, slack, slack_project
):
    viewer = factories.make_member(slack_project, "viewer", "vic")
    Membership.objects.filter(user=viewer).update(slack_user_id="U0VIC")
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)

    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, approve, user="U0VIC")

    assert "needs the reviewer role" in slack.of("response")[-1].json["text"]
    assert SlackInteraction.objects.get().status == InteractionStatus.REFUSED
    assert_still_proposed(revision)


def test_a_button_on_a_message_about_an_edited_revision_is_refused(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision, reject = propose_on_slack(
        slack, slack_project, django_capture_on_commit_callbacks, "Reject"
    )
    factories.supersede_by_edit(revision, rita)

    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, reject)

    assert "was already superseded by rita" in slack.of("response")[-1].json["text"]
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.SUPERSEDED


def test_a_candidate_version_can_be_promoted_from_slack_by_a_linked_admin(
    client, django_capture_on_commit_callbacks, slack, slack_project
):
    admin = factories.make_member(slack_project, "admin", "ada")
    Membership.objects.filter(user=admin).update(slack_user_id="U0ADA")
    with django_capture_on_commit_callbacks(execute=True):
        version = policy_version_create_candidate(
            project=slack_project,
            adapter_ref="tinker://run-1/sampler_weights/final",
            base_model="Qwen/Qwen3-8B",
            changelog="New adapter from the night's training.",
        )
    message = slack.of("webhook")[0].json
    assert "Candidate policy v" in message["text"]
    assert "tinker://run-1/sampler_weights/final" in json.dumps(message["blocks"])
    promote = buttons(message)["Promote"]

    with django_capture_on_commit_callbacks(execute=True):
        click(client, slack, promote, user="U0ADA")

    version.refresh_from_db()
    assert version.status == VersionStatus.ACTIVE
    assert "was promoted by ada" in slack.of("response")[-1].json["text"]


def test_a_decision_in_the_dashboard_is_posted_to_the_channel(
    django_capture_on_commit_callbacks, slack, slack_project, rita
):
    revision = propose(slack_project, django_capture_on_commit_callbacks)

    with django_capture_on_commit_callbacks(execute=True):
        skill_revision_approve(revision=revision, actor=rita)

    follow_up = slack.of("webhook")[-1].json
    assert len(slack.of("webhook")) == 2
    assert "was approved by rita" in follow_up["text"]


# --- Integration settings -----------------------------------------------------------------------


def test_only_admins_see_the_integration_settings(client, project):
    url = f"/p/{project.slug}/integrations/"
    client.force_login(factories.make_member(project, "reviewer"))
    assert client.get(url).status_code == 403
    client.force_login(factories.make_member(project, "admin"))
    assert client.get(url).status_code == 200


def test_admins_save_integration_settings_with_write_only_secrets(client, project):
    client.force_login(factories.make_member(project, "admin", "ada"))
    url = f"/p/{project.slug}/integrations/"
    form = {
        "slack_webhook_url": "https://hooks.slack.test/services/T/B/X",
        "slack_signing_secret": "shh",
        "webhook_url": "https://ci.example.com/metaclaw",
        "webhook_secret": "whsec",
        "notify_emails": "team@example.com\n\nops@example.com",
        "approval_link_ttl_hours": "24",
        "approval_links_require_login": "on",
    }

    assert client.post(url, form).status_code == 302
    project.refresh_from_db()
    assert project.slack_signing_secret == "shh" and project.webhook_secret == "whsec"
    assert project.notify_emails == "team@example.com\nops@example.com"
    assert project.approval_link_ttl_hours == 24 and project.approval_links_require_login
    page = client.get(url).content.decode()
    assert "shh" not in page and "whsec" not in page

    # An empty secret field keeps the stored secret; the clear box removes it.
    client.post(url, form | {"slack_signing_secret": "", "clear_webhook_secret": "on"})
    project.refresh_from_db()
    assert project.slack_signing_secret == "shh" and project.webhook_secret == ""
    changes = AuditEvent.objects.filter(action="project.integrations_update")
    assert changes.count() == 2 and "shh" not in json.dumps([c.after for c in changes])


def test_invalid_integration_settings_name_the_field_and_change_nothing(client, project):
    client.force_login(factories.make_member(project, "admin"))
    url = f"/p/{project.slug}/integrations/"

    bad_url = client.post(url, {"slack_webhook_url": "not a url", "approval_link_ttl_hours": "72"})
    bad_ttl = client.post(url, {"approval_link_ttl_hours": "0"})
    bad_mail = client.post(url, {"notify_emails": "nope", "approval_link_ttl_hours": "72"})

    assert bad_url.status_code == bad_ttl.status_code == bad_mail.status_code == 422
    assert bad_url.context["error_field"] == "slack_webhook_url"
    assert bad_ttl.context["error_field"] == "approval_link_ttl_hours"
    assert bad_mail.context["error_field"] == "notify_emails"
    project.refresh_from_db()
    assert project.slack_webhook_url == "" and project.approval_link_ttl_hours == 72


def test_send_a_test_message_reaches_every_configured_channel(
    client, django_capture_on_commit_callbacks, slack, project
):
    project = configure_slack_and_webhook(project, slack, notify_emails="team@example.com")
    client.force_login(factories.make_member(project, "admin", "ada"))

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/p/{project.slug}/integrations/test")

    assert response.status_code == 302
    assert "MetaClaw test message" in slack.of("webhook")[0].json["text"]
    assert slack.of("hook")[0].verified is True
    assert mail.outbox[0].to == ["team@example.com"]
    statuses = Notification.objects.filter(kind="test").values_list("channel", "status")
    assert sorted(statuses) == [("email", "sent"), ("slack", "sent"), ("webhook", "sent")]
    page = client.get(f"/p/{project.slug}/integrations/").content.decode()
    assert page.count('class="delivery delivery-sent"') == 3
    part = client.get(
        f"/p/{project.slug}/integrations/", {"part": "deliveries"}, HTTP_HX_REQUEST="true"
    ).content.decode()
    assert part.strip().startswith('<div id="deliveries">')
    assert part.count('class="delivery delivery-sent"') == 3


# --- Outbound addresses (SSRF) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/hook",
        "http://192.168.1.1/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://localhost/hook",
    ],
)
def test_private_and_loopback_addresses_are_refused_unless_allowed(settings, url):
    from skills.approvals import delivery

    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = False
    assert delivery.url_refusal(url) is not None
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = True
    assert delivery.url_refusal(url) is None


def test_a_public_address_is_allowed(settings):
    from skills.approvals import delivery

    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = False
    assert delivery.url_refusal("https://93.184.216.34/hook") is None


def test_integration_settings_refuse_a_loopback_or_metadata_webhook_url(
    client, settings, slack, project
):
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = False
    client.force_login(factories.make_member(project, "admin"))
    url = f"/p/{project.slug}/integrations/"

    loopback = client.post(url, {"webhook_url": slack.hook_url, "approval_link_ttl_hours": "72"})
    metadata = client.post(
        url,
        {
            "slack_webhook_url": "http://169.254.169.254/latest/meta-data/",
            "approval_link_ttl_hours": "72",
        },
    )

    assert loopback.status_code == metadata.status_code == 422
    assert loopback.context["error_field"] == "webhook_url"
    assert metadata.context["error_field"] == "slack_webhook_url"
    project.refresh_from_db()
    assert project.webhook_url == "" and project.slack_webhook_url == ""


def test_a_send_to_a_private_address_is_refused_at_send_time_and_recorded(
    django_capture_on_commit_callbacks, settings, slack, project
):
    # Stored before the check existed, or a name that now resolves to a private address.
    project = configure_slack_and_webhook(project, slack)
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = False

    propose(project, django_capture_on_commit_callbacks)

    assert slack.of("webhook") == [] and slack.of("hook") == []
    for channel in ("slack", "webhook"):
        notification = Notification.objects.get(channel=channel)
        assert notification.status == NotificationStatus.FAILED
        assert notification.attempts == 1
        assert "Refused to send to 127.0.0.1" in notification.last_error


# --- Slack endpoint hardening and the interaction sweep -------------------------------------


def _post_signed(client, body: str, secret: str | None):
    headers = slack_signed_headers(secret, body) if secret else {}
    return client.post(
        INTERACTIONS, data=body, content_type="application/x-www-form-urlencoded", **headers
    )


def test_a_deeply_nested_payload_is_refused_without_a_server_error(client, settings):
    settings.SLACK_SIGNING_SECRET = "site-wide-secret"
    body = urlencode({"payload": "[" * 100_000 + "]" * 100_000})

    unsigned = _post_signed(client, body, None)
    wrongly_signed = _post_signed(client, body, "someone-elses-secret")
    signed = _post_signed(client, body, "site-wide-secret")

    assert unsigned.status_code == wrongly_signed.status_code == 401
    assert signed.status_code == 400
    # A signed payload whose button value nests deeply is an unknown button, not a crash.
    nested_value = json.dumps({"actions": [{"value": "[" * 100_000}]})
    signed_value = _post_signed(client, urlencode({"payload": nested_value}), "site-wide-secret")
    assert signed_value.status_code == 200
    assert SlackInteraction.objects.get().project is None


def test_the_signature_is_checked_before_the_payload_is_parsed(client, monkeypatch):
    from types import SimpleNamespace

    import skills.approvals.views as views

    parsed = []

    def spy(*args, **kwargs):
        parsed.append(args)
        return json.loads(*args, **kwargs)

    monkeypatch.setattr(views, "json", SimpleNamespace(loads=spy))
    body = urlencode({"payload": json.dumps({"type": "block_actions"})})

    assert _post_signed(client, body, "not-a-known-secret").status_code == 401
    assert parsed == []


def test_a_click_signed_with_another_secret_than_its_project_has_is_refused(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita, settings
):
    settings.SLACK_SIGNING_SECRET = "site-wide-secret"
    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)

    with django_capture_on_commit_callbacks(execute=True):
        response, _ = click(client, slack, approve, secret="site-wide-secret")

    assert response.status_code == 401
    assert not SlackInteraction.objects.exists()
    assert_still_proposed(revision)


def test_the_sweep_processes_a_click_whose_task_was_lost_and_fails_stuck_ones(
    client, django_capture_on_commit_callbacks, slack, slack_project, rita
):
    from datetime import timedelta

    from django.utils import timezone

    from skills.approvals.tasks import sweep_slack_interactions

    revision, approve = propose_on_slack(slack, slack_project, django_capture_on_commit_callbacks)
    response, _ = click(client, slack, approve)  # the enqueue never happens (no commit)
    assert response.status_code == 200
    lost = SlackInteraction.objects.get()
    assert lost.status == InteractionStatus.RECEIVED
    # A fresh click is left to its own task.
    assert sweep_slack_interactions() == 0
    now = timezone.now()
    SlackInteraction.objects.filter(pk=lost.pk).update(created_at=now - timedelta(minutes=5))
    dead = SlackInteraction.objects.create(
        dedupe_key="d" * 64,
        project=slack_project,
        status=InteractionStatus.PROCESSING,
        created_at=now - timedelta(hours=1),
    )
    too_old = SlackInteraction.objects.create(
        dedupe_key="o" * 64,
        project=slack_project,
        status=InteractionStatus.RECEIVED,
        created_at=now - timedelta(hours=2),
    )
    live = SlackInteraction.objects.create(
        dedupe_key="l" * 64, project=slack_project, status=InteractionStatus.PROCESSING
    )

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep_slack_interactions() == 1

    lost.refresh_from_db()
    assert lost.status == InteractionStatus.DONE and lost.result == "approved"
    revision.refresh_from_db()
    assert revision.status == RevisionStatus.APPROVED
    for row, status in ((dead, "failed"), (too_old, "failed"), (live, "processing")):
        row.refresh_from_db()
        assert row.status == status, row
    assert "click again" in dead.result
