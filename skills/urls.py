"""Dashboard pages of the skills app, included at the site root (project-scoped paths): the
review queue, versions and library pages (``skills.versions.views``) and the fast loop's retry
action (``skills.synthesis.views``), under one namespace so their names stay ``skills:*``."""

from django.urls import path

from skills.canary import views as canary_views
from skills.effectiveness import views as effectiveness_views
from skills.gate import views as gate_views
from skills.skillmd import views as skillmd_views
from skills.synthesis import views as synthesis_views
from skills.versions import views

app_name = "skills"

P = "p/<slug:project_slug>/"

urlpatterns = [
    path(P + "review/", views.review_queue, name="review_queue"),
    path(P + "review/<int:revision_id>/", views.revision_detail, name="revision_detail"),
    path(P + "review/<int:revision_id>/approve/", views.revision_approve, name="revision_approve"),
    path(P + "review/<int:revision_id>/reject/", views.revision_reject, name="revision_reject"),
    path(P + "review/<int:revision_id>/edit/", views.revision_edit, name="revision_edit"),
    path(P + "versions/", views.version_list, name="version_list"),
    path(P + "versions/diff/", views.version_diff, name="version_diff"),
    path(P + "versions/new/", views.version_compose, name="version_compose"),
    path(P + "versions/<int:number>/", views.version_detail, name="version_detail"),
    path(P + "versions/<int:number>/promote/", views.version_promote, name="version_promote"),
    path(P + "versions/<int:number>/rollback/", views.version_rollback, name="version_rollback"),
    path(P + "versions/<int:number>/reject/", views.version_reject, name="version_reject"),
    path(
        P + "versions/<int:number>/replay-gate/",
        gate_views.replay_gate_panel,
        name="replay_gate_panel",
    ),
    path(
        P + "versions/<int:number>/replay-gate/run/",
        gate_views.replay_gate_run,
        name="replay_gate_run",
    ),
    path(P + "canary/", canary_views.canary_panel, name="canary_panel"),
    path(P + "canary/start/", canary_views.canary_start, name="canary_start"),
    path(P + "canary/stop/", canary_views.canary_stop, name="canary_stop"),
    path(P + "canary/promote/", canary_views.canary_promote, name="canary_promote"),
    path(P + "skills/", views.skill_library, name="skill_library"),
    path(P + "skills/import/", skillmd_views.skill_import, name="skill_import"),
    path(
        P + "skills/import/<str:import_id>/progress/",
        skillmd_views.skill_import_progress,
        name="skill_import_progress",
    ),
    path(
        P + "groups/<int:group_id>/retry-synthesis/",
        synthesis_views.group_retry_synthesis,
        name="group_retry_synthesis",
    ),
    path(
        P + "review/<int:revision_id>/effectiveness/",
        effectiveness_views.revision_effectiveness,
        name="revision_effectiveness",
    ),
    path(
        P + "versions/<int:number>/effectiveness/",
        effectiveness_views.version_effectiveness,
        name="version_effectiveness",
    ),
    path(
        P + "groups/<int:group_id>/effectiveness/",
        effectiveness_views.group_effectiveness,
        name="group_effectiveness",
    ),
]
