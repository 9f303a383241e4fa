"""Training pages, included at the site root: the runs with their progress and actions, and
the idle-window settings, all below one project-scoped prefix."""

from django.urls import path

from training.runs import views

app_name = "training"

PREFIX = "p/<slug:project_slug>/training/"

# (route below PREFIX, view, URL name), in matching order: the first route that matches wins.
PAGES = [
    ("", views.training_home, "home"),
    ("settings/", views.training_settings, "settings"),
    ("runs/", views.run_create, "run_create"),
    ("runs/<int:run_id>/", views.run_detail, "run_detail"),
    ("runs/<int:run_id>/progress/", views.run_progress, "run_progress"),
    ("runs/<int:run_id>/<str:action>/", views.run_action, "run_action"),
]

urlpatterns = [path(PREFIX + route, view, name=name) for route, view, name in PAGES]
