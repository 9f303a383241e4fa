"""Incident pages, mounted at ``p/<slug:project_slug>/``: onboarding, groups (with their status,
merge and split actions), recorded turns and abusive sources. Each page's URL name is its view's
name, as in ``skills.urls``."""

from __future__ import annotations

from django.urls import path

from incidents import views

app_name = "incidents"

# (route, view), in matching order: the first route that matches wins.
PAGES = [
    ("onboarding/", views.onboarding),
    ("groups/", views.group_list),
    ("groups/<int:group_id>/", views.group_detail),
    ("groups/<int:group_id>/status/", views.group_status),
    ("groups/<int:group_id>/merge/", views.group_merge),
    ("groups/<int:group_id>/split/", views.group_split),
    ("turns/", views.turn_list),
    ("turns/<uuid:turn_id>/", views.turn_detail),
    ("abusive-sources/", views.abusive_source_mark),
    ("abusive-sources/<int:mark_id>/unmark/", views.abusive_source_unmark),
]

urlpatterns = [path(route, view, name=view.__name__) for route, view in PAGES]
