"""Slack: linking a member's Slack identity, verifying Slack's request signatures (per project
or site-wide), and the buttons' interactions, recorded at once and handled by a worker."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core import signing
from django.db import IntegrityError, transaction
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from base.errors import DomainError, NotFound, PermissionDenied
from base.models import Membership, Project
from base.queue import enqueue
from base.services import audit_record
from skills.approvals import delivery
from skills.approvals.links import chat_approval_refusal, decided_message, object_state
from skills.approvals.models import (
    InteractionStatus,
    Notification,
    NotificationChannel,
    NotificationKind,
    SlackInteraction,
)
from skills.library.models import RevisionStatus, SkillRevision
from skills.versions.models import PolicyVersion
from skills.versions.services import (
    policy_version_promote,
    skill_revision_approve,
    skill_revision_reject,
)

logger = logging.getLogger(__name__)


SLACK_LINK_SALT = "metaclaw.slack-link"
SLACK_LINK_MAX_AGE = 24 * 3600


# --- Slack: identity linking and interactions ----------------------------------------------


def slack_link_token(*, project: Project, slack_user_id: str, slack_team_id: str = "") -> str:
    return signing.dumps(
        {"p": project.pk, "u": slack_user_id, "t": slack_team_id}, salt=SLACK_LINK_SALT
    )


def slack_link_url(*, project: Project, slack_user_id: str, slack_team_id: str = "") -> str:
    signed = slack_link_token(
        project=project, slack_user_id=slack_user_id, slack_team_id=slack_team_id
    )
    return settings.METACLAW_PUBLIC_URL + reverse("approvals:slack_link", kwargs={"signed": signed})


def slack_link_resolve(*, signed: str) -> tuple[Project, str]:
    """The project and Slack user id a linking URL names; DomainError if forged or old."""
    try:
        data = signing.loads(signed, salt=SLACK_LINK_SALT, max_age=SLACK_LINK_MAX_AGE)
    except signing.SignatureExpired as exc:
        raise DomainError(
            "This linking link expired; click a button in Slack again.", code="expired"
        ) from exc
    except signing.BadSignature as exc:
        raise DomainError("This linking link is not valid.", code="unknown") from exc
    project = Project.objects.filter(pk=data.get("p")).first()
    if project is None or not data.get("u"):
        raise NotFound("This linking link is not valid.")
    return project, str(data["u"])


@transaction.atomic
def membership_link_slack(*, project: Project, user: Any, slack_user_id: str) -> Membership:
    """Link a Slack user id to the user's membership (Sentry's ``/sentry link``). One Slack
    user maps to one member per project: an older link of the same id is removed."""
    membership = (
        Membership.objects.select_for_update().filter(project=project, user=user).first()
        if getattr(user, "is_authenticated", False)
        else None
    )
    if membership is None:
        raise PermissionDenied(f"You are not a member of {project.name}.")
    Membership.objects.filter(project=project, slack_user_id=slack_user_id).exclude(
        pk=membership.pk
    ).update(slack_user_id="")
    before = membership.slack_user_id
    membership.slack_user_id = slack_user_id
    membership.save(update_fields=["slack_user_id"])
    audit_record(
        action="membership.link_slack",
        project=project,
        actor=user,
        obj=membership,
        before={"slack_user_id": before},
        after={"slack_user_id": slack_user_id},
    )
    return membership


# Our button value ({"p":<project id>,...}) as it appears JSON-encoded inside the payload.
_PROJECT_IN_PAYLOAD = re.compile(r'\\"p\\"\s*:\s*(\d{1,9})\b')


def slack_signature_secret(
    *, raw_payload: str, body: bytes, timestamp: str | None, signature: str | None
) -> str | None:
    """The secret that verifies a Slack request's signature over its raw ``body``, or None.
    Tried: the secrets of the (at most three) projects our button values in the raw payload
    name, found by a bounded scan (no JSON parsing of unverified input), then the site-wide
    secret. The caller still checks that the verified payload names a project with this
    secret."""
    if not timestamp or not signature:
        return None
    ids: list[int] = []
    for match in _PROJECT_IN_PAYLOAD.finditer(raw_payload or ""):
        project_id = int(match.group(1))
        if project_id not in ids:
            ids.append(project_id)
        if len(ids) == 3:
            break
    candidates = [
        secret
        for secret in Project.objects.filter(pk__in=ids)
        .exclude(slack_signing_secret="")
        .values_list("slack_signing_secret", flat=True)
    ]
    if settings.SLACK_SIGNING_SECRET:
        candidates.append(settings.SLACK_SIGNING_SECRET)
    for secret in candidates:
        if delivery.slack_signature_valid(
            secret=secret, body=body, timestamp=timestamp, signature=signature
        ):
            return secret
    return None


def slack_signing_secret_for(payload: dict) -> tuple[Project | None, str]:
    """The project a Slack payload names (through our button's value) and the secret to verify
    it with. The payload is untrusted until verified; a forged project id only picks a secret
    the forger does not know."""
    project = None
    try:
        value = json.loads(payload["actions"][0]["value"])
        project = Project.objects.filter(pk=int(value["p"])).first()
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        project = None
    secret = (project.slack_signing_secret if project else "") or settings.SLACK_SIGNING_SECRET
    return project, secret


def slack_interaction_record(
    *, project: Project | None, raw_payload: str, payload: dict
) -> tuple[SlackInteraction, bool]:
    """Store a verified interaction once. Slack's retries (``X-Slack-Retry-Num``) and duplicate
    deliveries carry the same payload, hence the same key: they only count a delivery.
    Returns the row and whether it is new (only a new row gets processed)."""
    key = hashlib.sha256(raw_payload.encode()).hexdigest()
    action = (payload.get("actions") or [{}])[0]
    try:
        with transaction.atomic():
            interaction = SlackInteraction.objects.create(
                project=project,
                dedupe_key=key,
                slack_user_id=str((payload.get("user") or {}).get("id", ""))[:64],
                slack_team_id=str((payload.get("team") or {}).get("id", ""))[:64],
                action_id=str(action.get("action_id", ""))[:100],
                payload=payload,
                response_url=str(payload.get("response_url", ""))[:1000],
            )
    except IntegrityError:
        SlackInteraction.objects.filter(dedupe_key=key).update(deliveries=F("deliveries") + 1)
        return SlackInteraction.objects.get(dedupe_key=key), False
    if interaction.action_id in delivery.SLACK_ACTIONS:
        transaction.on_commit(lambda: _enqueue_interaction(interaction.pk))
    else:
        # URL buttons (Open, or links when interactivity is off) also reach us; nothing to do.
        SlackInteraction.objects.filter(pk=interaction.pk).update(
            status=InteractionStatus.DONE, processed_at=timezone.now(), result="ignored"
        )
    return interaction, True


def _enqueue_interaction(interaction_id: int) -> None:
    enqueue("skills.tasks.process_slack_interaction", interaction_id)


@dataclass(frozen=True)
class SlackReply:
    response_url: str
    body: dict


def _slack_refuse(interaction: SlackInteraction, text: str) -> SlackReply:
    interaction.status = InteractionStatus.REFUSED
    interaction.result = text[:2000]
    interaction.processed_at = timezone.now()
    interaction.save(update_fields=["status", "result", "processed_at"])
    return SlackReply(interaction.response_url, delivery.slack_ephemeral(text))


# Slack accepts replies through a response_url for 30 minutes; a click older than that is not
# acted on any more.
SLACK_INTERACTION_MAX_AGE = timedelta(minutes=30)


def slack_interaction_handle(*, interaction_id: int) -> SlackReply | None:
    """Act on one button click, at most once: claim the row (RECEIVED → PROCESSING), map the
    Slack user to a member, check that the message still shows the object as it is, and call
    the same decision service as the dashboard. Returns what to tell the clicker (ephemeral),
    or None when the decision itself updates the message (``approval_decision_notify``)."""
    # A click older than Slack's response window is not acted on (the sweep marks it FAILED).
    claimed = SlackInteraction.objects.filter(
        pk=interaction_id,
        status=InteractionStatus.RECEIVED,
        created_at__gte=timezone.now() - SLACK_INTERACTION_MAX_AGE,
    ).update(status=InteractionStatus.PROCESSING)
    if claimed != 1:
        return None
    interaction = SlackInteraction.objects.select_related("project").get(pk=interaction_id)
    payload = interaction.payload
    project = interaction.project
    try:
        value = json.loads(payload["actions"][0]["value"])
        kind, object_id, state = value["k"], int(value["id"]), str(value["s"])
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        return _slack_refuse(interaction, "MetaClaw did not recognise this button.")
    if project is None:
        return _slack_refuse(interaction, "MetaClaw did not recognise this project.")
    membership = (
        Membership.objects.filter(project=project, slack_user_id=interaction.slack_user_id)
        .exclude(slack_user_id="")
        .select_related("user")
        .first()
    )
    if membership is None:
        url = slack_link_url(
            project=project,
            slack_user_id=interaction.slack_user_id,
            slack_team_id=interaction.slack_team_id,
        )
        return _slack_refuse(
            interaction,
            f"Your Slack account is not linked to a member of {project.name} yet. "
            f"Link it here, then click again: {url}",
        )
    obj: SkillRevision | PolicyVersion | None
    if kind == "revision":
        obj = (
            SkillRevision.objects.select_related("skill__project")
            .filter(pk=object_id, skill__project=project)
            .first()
        )
    else:
        obj = PolicyVersion.objects.filter(pk=object_id, project=project).first()
    if obj is None:
        return _slack_refuse(interaction, "This object no longer exists.")
    if object_state(obj)[:16] != state:
        decided = decided_message(obj)
        return _slack_refuse(
            interaction, decided or f"{obj} changed since this message; open it in MetaClaw."
        )
    Notification.objects.filter(
        channel=NotificationChannel.SLACK,
        kind=NotificationKind.APPROVAL_REQUEST,
        **({"revision": obj} if kind == "revision" else {"version": obj}),
    ).update(slack_response_url=interaction.response_url, slack_response_url_at=timezone.now())
    user = membership.user
    action_id = interaction.action_id
    try:
        if action_id == delivery.SLACK_APPROVE and kind == "revision":
            refusal = chat_approval_refusal(obj)
            if refusal:
                return _slack_refuse(interaction, refusal)
            obj = skill_revision_approve(revision=obj, actor=user, via_link=True)
            outcome = "approved" if obj.status == RevisionStatus.APPROVED else "first approval"
        elif action_id == delivery.SLACK_REJECT and kind == "revision":
            skill_revision_reject(
                revision=obj, actor=user, reason=f"Rejected in Slack by {user.get_username()}."
            )
            outcome = "rejected"
        elif action_id == delivery.SLACK_PROMOTE and kind == "version":
            policy_version_promote(version=obj, actor=user, reason="Promoted in Slack.")
            outcome = "promoted"
        else:
            return _slack_refuse(interaction, "MetaClaw did not recognise this button.")
    except DomainError as exc:
        return _slack_refuse(interaction, str(exc))
    interaction.status = InteractionStatus.DONE
    interaction.result = outcome
    interaction.processed_at = timezone.now()
    interaction.save(update_fields=["status", "result", "processed_at"])
    if outcome == "first approval":
        return SlackReply(
            interaction.response_url,
            delivery.slack_ephemeral(
                "Your approval is recorded. This project needs a second reviewer to approve."
            ),
        )
    return None


def slack_interactions_stuck(*, older_than_seconds: int) -> list[int]:
    """Interactions nobody finished. PROCESSING ones whose worker died and RECEIVED ones older
    than Slack's response window are marked FAILED (the clicker may click again; a decision
    that did happen changed the object's state, so a second click is refused as already
    decided). RECEIVED ones whose task message was lost (the broker was down at commit) are
    returned, for the sweep to enqueue again; the claim in ``slack_interaction_handle`` makes
    a duplicate message a no-op."""
    now = timezone.now()
    # Rows carry no claim time, but a click is claimed within SLACK_INTERACTION_MAX_AGE of its
    # arrival or never: so one created longer ago than that plus twice the task time limit
    # (a live attempt is killed by then) has no live worker.
    dead = (
        now
        - SLACK_INTERACTION_MAX_AGE
        - timedelta(seconds=max(older_than_seconds, 2 * settings.CELERY_TASK_TIME_LIMIT))
    )
    SlackInteraction.objects.filter(
        status=InteractionStatus.PROCESSING, created_at__lt=dead
    ).update(
        status=InteractionStatus.FAILED,
        result="The worker processing this click stopped; click again if nothing changed.",
        processed_at=now,
    )
    SlackInteraction.objects.filter(
        status=InteractionStatus.RECEIVED, created_at__lt=now - SLACK_INTERACTION_MAX_AGE
    ).update(
        status=InteractionStatus.FAILED,
        result="This click was not processed in time; click again.",
        processed_at=now,
    )
    return list(
        SlackInteraction.objects.filter(
            status=InteractionStatus.RECEIVED,
            created_at__lt=now - timedelta(seconds=older_than_seconds),
        )
        .order_by("created_at")
        .values_list("pk", flat=True)[:500]
    )


def slack_interaction_fail(*, interaction_id: int, error: str) -> None:
    SlackInteraction.objects.filter(pk=interaction_id).update(
        status=InteractionStatus.FAILED, result=error[:2000], processed_at=timezone.now()
    )
