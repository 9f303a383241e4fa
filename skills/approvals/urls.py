"""Approval links, Slack's endpoints and the integration settings (mounted at the site root).
Each route's URL name is its view's name, as in ``skills.urls``."""

from __future__ import annotations

from django.urls import path

from skills.approvals import views

app_name = "approvals"

ROUTES = [
    ("a/<str:token>", views.link),
    ("integrations/slack/interactions", views.slack_interactions),
    ("integrations/slack/link/<str:signed>", views.slack_link),
    ("p/<slug:project_slug>/integrations/", views.integrations),
    ("p/<slug:project_slug>/integrations/test", views.integrations_test),
]

urlpatterns = [path(route, view, name=view.__name__) for route, view in ROUTES]
