"""Approvals where reviewers are: signed, expiring, single-use approval links; notifications to
Slack, webhooks and e-mail (with retries and a sweep); Slack's interactivity endpoint and
identity linking; a project's integration settings.

Owns the ApprovalRequest, Notification and SlackInteraction rows (``models``). The decisions
themselves are the versions' services: a link calls the same service as the dashboard. Imports
the library, the versions, ``incidents`` and ``base``; nothing else in ``skills`` imports it (the
app's ``ready`` connects its receivers).
"""
