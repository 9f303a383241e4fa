"""Approval links, Slack's endpoints and the integration settings (mounted at the site root)."""

from __future__ import annotations

from django.urls import path

from skills.approvals import views

app_name = "approvals"

urlpatterns = [
    path("a/<str:token>", views.link, name="link"),
    path("integrations/slack/interactions", views.slack_interactions, name="slack_interactions"),
    path("integrations/slack/link/<str:signed>", views.slack_link, name="slack_link"),
    path("p/<slug:project_slug>/integrations/", views.integrations, name="integrations"),
    path(
        "p/<slug:project_slug>/integrations/test",
        views.integrations_test,
        name="integrations_test",
    ),
]
