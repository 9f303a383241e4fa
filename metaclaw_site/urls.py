"""URL configuration: the composition root that mounts every app."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from base import views
from skills.runtime import proxy

from .api import api

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("livez", views.livez, name="livez"),
    path("readyz", views.readyz, name="readyz"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("switch-project/", views.switch_project, name="switch_project"),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    path("p/<slug:project_slug>/", include("incidents.urls")),
    path("p/<slug:project_slug>/", include("base.urls")),
    path("", include("skills.approvals.urls")),
    path("v1/chat/completions", proxy.chat_completions, name="proxy_chat_completions"),
]

# Optional app URL modules (pages of the skills and training apps, approval links, the proxy).
for _module in ("skills.urls", "training.urls"):
    try:
        __import__(_module)
    except ModuleNotFoundError as exc:
        if exc.name != _module:
            raise
        continue
    urlpatterns.append(path("", include(_module)))
