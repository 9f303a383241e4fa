from django.urls import path

from training.runs import views

app_name = "training"

urlpatterns = [
    path("p/<slug:project_slug>/training/", views.training_home, name="home"),
    path("p/<slug:project_slug>/training/settings/", views.training_settings, name="settings"),
    path("p/<slug:project_slug>/training/runs/", views.run_create, name="run_create"),
    path("p/<slug:project_slug>/training/runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path(
        "p/<slug:project_slug>/training/runs/<int:run_id>/progress/",
        views.run_progress,
        name="run_progress",
    ),
    path(
        "p/<slug:project_slug>/training/runs/<int:run_id>/<str:action>/",
        views.run_action,
        name="run_action",
    ),
]
