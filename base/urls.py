"""Project administration pages (and the getting-started panel), mounted at
``p/<slug:project_slug>/``."""

from __future__ import annotations

from django.urls import path

from base import views

app_name = "project"

urlpatterns = [
    path("audit/", views.audit_log, name="audit_log"),
    path("keys/", views.api_keys, name="api_keys"),
    path("keys/create/", views.api_keys_create, name="api_keys_create"),
    path("keys/<int:key_id>/revoke/", views.api_keys_revoke, name="api_keys_revoke"),
    path("members/", views.members, name="members"),
    path("members/add/", views.members_add, name="members_add"),
    path("members/<int:user_id>/role/", views.members_set_role, name="members_set_role"),
    path("members/<int:user_id>/remove/", views.members_remove, name="members_remove"),
    path("settings/", views.project_settings, name="settings"),
    path("settings/test-connection/", views.project_settings_test, name="settings_test"),
]
