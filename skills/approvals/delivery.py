"""Senders for approval notifications: Slack (incoming webhook + response_url), a generic signed
webhook, and e-mail through Django's mail backend. Builders make the messages; ``deliver``
sends one stored ``Notification``. No database writes here: the caller records the outcome.

The generic webhook signs every delivery: ``X-MetaClaw-Timestamp: <unix seconds>`` and
``X-MetaClaw-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>``. A receiver
recomputes it over the raw body, compares in constant time and refuses old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.mail import EmailMultiAlternatives

from base import outbound

if TYPE_CHECKING:
    from skills.approvals.models import Notification
    from skills.library.models import SkillRevision
    from skills.versions.models import PolicyVersion

TIMEOUT = httpx.Timeout(5.0, connect=3.0)
USER_AGENT = "MetaClaw-Notifier/1"

SLACK_APPROVE = "metaclaw_approve"
SLACK_REJECT = "metaclaw_reject"
SLACK_PROMOTE = "metaclaw_promote"
SLACK_OPEN = "metaclaw_open"
SLACK_ACTIONS = {SLACK_APPROVE, SLACK_REJECT, SLACK_PROMOTE}

TOKEN_IN_LINK = re.compile(r"(/a/)[A-Za-z0-9_\-]{16,}")

APPROVE, REJECT, PROMOTE = "approve_revision", "reject_revision", "promote_version"


class DeliveryError(Exception):
    """A delivery failed and may succeed later (network error, 5xx, 429)."""


class PermanentDeliveryError(DeliveryError):
    """A delivery failed in a way retrying cannot fix (4xx: the webhook was removed...)."""


# --- Where we may send -----------------------------------------------------------------------


def url_refusal(url: str) -> str | None:
    """Why ``url`` must not be posted to, or None: ``base.outbound``'s check (http(s) only, and
    only to hosts whose every address is public, unless ``METACLAW_ALLOW_PRIVATE_WEBHOOKS``), so
    a project setting cannot turn the worker into a proxy into the internal network. Every post
    is checked again when it is sent, and goes to the address that check resolved."""
    return outbound.url_refusal(url)


@dataclass
class Summary:
    """What every channel says about the object awaiting a decision."""

    project_name: str
    project_id: int
    kind: str  # "revision" | "version"
    object_id: int
    state: str  # the object's state hash prefix; a button for an older state is refused
    title: str
    revision: SkillRevision | None = None
    version: PolicyVersion | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    diff: dict[str, Any] = field(default_factory=dict)


# --- Slack -------------------------------------------------------------------------------


def _esc(text: str) -> str:
    """Slack mrkdwn needs only these three escaped."""
    return (text or "").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _details(summary: Summary) -> list[dict]:
    if summary.revision is not None:
        r = summary.revision
        ev = summary.evidence
        blocks = [
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": _cut(
                        f"*{_esc(r.name)}* (`{r.skill.slug}` r{r.number}, {r.category})\n"
                        f"_When:_ {_esc(r.description)}",
                        2900,
                    ),
                },
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "```" + _esc(_cut(r.instructions, 700)) + "```"},
            },
        ]
        evidence = f"Evidence: {ev.get('incidents', 0)} incident(s), {ev.get('events', 0)} event(s)"
        if ev.get("excerpt"):
            evidence += f" · “{_esc(_cut(ev['excerpt'], 200))}”"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": evidence}]})
        return blocks
    v = summary.version
    diff = summary.diff
    lines = [f"*{_esc(_cut(v.changelog or 'No changelog.', 600))}*"]
    if diff.get("adapter_from") != diff.get("adapter_to"):
        before, after = diff.get("adapter_from") or "none", diff.get("adapter_to") or "none"
        lines.append(f"Adapter: `{before}` → `{after}`")
    if diff.get("base_model_from") != diff.get("base_model_to"):
        lines.append(
            f"Base model: {diff.get('base_model_from') or '—'} → {diff.get('base_model_to')}"
        )
    for label, items in (("Added", diff.get("added", [])), ("Removed", diff.get("removed", []))):
        if items:
            names = ", ".join(f"{r.skill.slug} r{r.number}" for r in items[:10])
            lines.append(f"{label} skills: {_esc(names)}")
    if diff.get("changed"):
        names = ", ".join(
            f"{new.skill.slug} r{old.number}→r{new.number}" for old, new in diff["changed"][:10]
        )
        lines.append(f"Changed skills: {_esc(names)}")
    return [{"type": "section", "text": {"type": "mrkdwn", "text": _cut("\n".join(lines), 2900)}}]


def _value(summary: Summary) -> str:
    return json.dumps(
        {"p": summary.project_id, "k": summary.kind, "id": summary.object_id, "s": summary.state},
        separators=(",", ":"),
    )


def slack_approval_message(summary: Summary, links: dict[str, str], *, interactive: bool) -> dict:
    """Block Kit: summary, evidence excerpt, and Approve / Reject (or Promote) / Open buttons.

    With interactivity configured (a signing secret), the decision buttons carry ``action_id``
    and ``value`` and act through ``/integrations/slack/interactions``; without it they are URL
    buttons to the signed channel links. Open is always a URL button to the confirmation page."""
    value = _value(summary)
    buttons: list[dict] = []
    decisions = (
        [(SLACK_APPROVE, "Approve", "primary", APPROVE), (SLACK_REJECT, "Reject", "danger", REJECT)]
        if summary.kind == "revision"
        else [(SLACK_PROMOTE, "Promote", "primary", PROMOTE)]
    )
    for action_id, label, style, link_action in decisions:
        button: dict[str, Any] = {
            "type": "button",
            "text": {"type": "plain_text", "text": label},
            "style": style,
        }
        if interactive:
            button.update(action_id=action_id, value=value)
            if style == "danger" or summary.kind == "version":
                button["confirm"] = {
                    "title": {"type": "plain_text", "text": f"{label}?"},
                    "text": {
                        "type": "mrkdwn",
                        "text": _cut(f"{label}: {_esc(summary.title)}", 300),
                    },
                    "confirm": {"type": "plain_text", "text": label},
                    "deny": {"type": "plain_text", "text": "Cancel"},
                }
        elif link_action in links:
            button.update(action_id=f"{SLACK_OPEN}_{link_action}", url=links[link_action])
        else:
            continue
        buttons.append(button)
    open_link = links.get(APPROVE) or links.get(PROMOTE)
    if open_link:
        buttons.append(
            {
                "type": "button",
                "text": {"type": "plain_text", "text": "Open"},
                "action_id": SLACK_OPEN,
                "url": open_link,
            }
        )
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": _cut(summary.title, 150)}},
        *_details(summary),
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"{_esc(summary.project_name)} · MetaClaw"}],
        },
    ]
    if buttons:
        blocks.append(
            {
                "type": "actions",
                "block_id": f"metaclaw_{summary.kind}_{summary.object_id}",
                "elements": buttons,
            }
        )
    return {"text": f"{summary.title} ({summary.project_name})", "blocks": blocks}


def slack_decided_message(summary: Summary, decided: str) -> dict:
    """The request message again, without buttons, saying who decided."""
    text = decided.replace(" was already ", " was ").replace(" is already ", " is ")
    return {
        "replace_original": True,
        "text": f"{summary.title}: {text}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": _cut(summary.title, 150)}},
            *_details(summary),
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f":white_check_mark: {_esc(text)}"},
            },
        ],
    }


def slack_text_message(text: str) -> dict:
    return {
        "text": text,
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": _esc(text)}}],
    }


def slack_ephemeral(text: str) -> dict:
    return {"response_type": "ephemeral", "replace_original": False, "text": text}


def _post_json(url: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return _post_raw(url, raw, headers)


def _post_raw(url: str, raw: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    # The guard checks the host's addresses as it connects and connects to the checked one
    # (a name that answers differently at connect time cannot reach the internal network).
    try:
        with outbound.client(timeout=TIMEOUT, headers={"User-Agent": USER_AGENT}) as client:
            response = client.post(
                url,
                content=raw,
                headers={"Content-Type": "application/json", **(headers or {})},
            )
    except outbound.OutboundRefused as exc:
        raise PermanentDeliveryError(f"Refused to send to {host_of(url)}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
    if response.status_code >= 300:
        # The status line only: the body is the receiver's, and may be anything it chose to
        # show (it is stored and displayed on the integrations page).
        reason = httpx.codes.get_reason_phrase(response.status_code)
        message = f"{host_of(url)} answered {response.status_code}" + (
            f" {reason}" if reason else ""
        )
        if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            raise PermanentDeliveryError(message)
        raise DeliveryError(message)
    return response


def slack_signature_valid(
    *, secret: str, body: bytes, timestamp: str | None, signature: str | None
) -> bool:
    """Slack's request signature (``v0=`` HMAC-SHA256 over ``v0:{timestamp}:{body}``), compared
    in constant time; timestamps more than 300 s away from now are refused."""
    from slack_sdk.signature import SignatureVerifier

    if not secret or not timestamp or not signature:
        return False
    try:
        return SignatureVerifier(signing_secret=secret).is_valid(
            body=body, timestamp=timestamp, signature=signature
        )
    except ValueError:  # a timestamp that is not a number
        return False


def slack_respond(response_url: str, body: dict) -> None:
    """Answer through an interaction's response_url (ephemeral reply, or replace the message)."""
    _post_json(response_url, body)


# --- Generic webhook -----------------------------------------------------------------------


def webhook_signature(secret: str, timestamp: str, raw_body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + raw_body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def webhook_post(url: str, secret: str, body: dict, *, event: str = "") -> None:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    timestamp = str(int(time.time()))
    headers = {
        "X-MetaClaw-Timestamp": timestamp,
        "X-MetaClaw-Event": event or body.get("event", ""),
    }
    if secret:
        headers["X-MetaClaw-Signature"] = webhook_signature(secret, timestamp, raw)
    _post_raw(url, raw, headers)


def webhook_event(
    event: str, summary: Summary, links: dict[str, str], *, decision: str = ""
) -> dict:
    body: dict[str, Any] = {
        "event": event,
        "project": {"id": summary.project_id, "name": summary.project_name},
        "object": {"type": summary.kind, "id": summary.object_id, "title": summary.title},
        "links": {key.split("_")[0]: url for key, url in links.items()},
    }
    if summary.revision is not None:
        r = summary.revision
        body["object"].update(
            skill=r.skill.slug,
            number=r.number,
            name=r.name,
            description=r.description,
            instructions=r.instructions,
            status=r.status,
            evidence=summary.evidence,
        )
    elif summary.version is not None:
        v = summary.version
        body["object"].update(
            number=v.number, status=v.status, adapter_ref=v.adapter_ref, changelog=v.changelog
        )
    if decision:
        body["decision"] = decision
    return body


# --- E-mail --------------------------------------------------------------------------------


def approval_email(summary: Summary, links: dict[str, str], *, personal: bool) -> dict:
    lines = [summary.title, f"Project: {summary.project_name}", ""]
    if summary.revision is not None:
        r = summary.revision
        ev = summary.evidence
        lines += [
            f"{r.name} ({r.skill.slug} r{r.number})",
            f"When to use it: {r.description}",
            "",
            _cut(r.instructions, 2000),
            "",
            f"Evidence: {ev.get('incidents', 0)} incident(s), {ev.get('events', 0)} event(s).",
        ]
        if ev.get("excerpt"):
            lines.append(f"Example: {ev['excerpt']}")
    elif summary.version is not None:
        lines += [summary.version.changelog or "No changelog."]
    lines.append("")
    labels = {APPROVE: "Approve", REJECT: "Reject", PROMOTE: "Promote"}
    for action, url in links.items():
        lines.append(f"{labels.get(action, action)}: {url}")
    lines += [
        "",
        "Each link opens a confirmation page; nothing happens until you press its button."
        + (" The links are for you alone and work once." if personal else " Log in to decide."),
    ]
    return {"subject": f"[MetaClaw] {summary.title}", "text": "\n".join(lines)}


def email_send(*, to: list[str], subject: str, text: str) -> None:
    try:
        EmailMultiAlternatives(
            subject=subject, body=text, from_email=settings.DEFAULT_FROM_EMAIL, to=to
        ).send(fail_silently=False)
    except Exception as exc:  # noqa: BLE001 - SMTP and backend errors vary; all are retryable
        raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc


# --- One stored notification ---------------------------------------------------------------


def deliver(notification: Notification) -> None:
    """Send ``notification`` (its payload as stored; URLs and secrets read from its project
    now, so a fixed setting helps the next retry). Raises DeliveryError."""
    project = notification.project
    payload = notification.payload
    if notification.channel == "slack":
        if payload.get("mode") == "response_url":
            slack_respond(payload["url"], payload["body"])
            return
        url = project.slack_webhook_url or settings.SLACK_WEBHOOK_URL
        if not url:
            raise PermanentDeliveryError("No Slack webhook URL is configured.")
        _post_json(url, payload["body"])
    elif notification.channel == "webhook":
        if not project.webhook_url:
            raise PermanentDeliveryError("No webhook URL is configured.")
        webhook_post(project.webhook_url, project.webhook_secret, payload["body"])
    elif notification.channel == "email":
        email_send(to=payload["to"], subject=payload["subject"], text=payload["text"])
    else:
        raise PermanentDeliveryError(f"Unknown channel {notification.channel!r}.")


def strip_tokens(payload: dict) -> dict:
    """The payload with every one-time link's token blanked out."""
    return json.loads(TOKEN_IN_LINK.sub(r"\1[sent]", json.dumps(payload)))


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url[:60]
