"""Dashboard pages of the skills app, included at the site root (project-scoped paths): the
review queue, versions and library pages (``skills.versions.views``), the replay gate, the
canary, SKILL.md import, effectiveness and the fast loop's retry action, under one namespace so
their names stay ``skills:*``. Each page's URL name is its view's name."""

from django.urls import path

from skills.canary import views as canary_views
from skills.effectiveness import views as effectiveness_views
from skills.gate import views as gate_views
from skills.skillmd import views as skillmd_views
from skills.synthesis import views as synthesis_views
from skills.versions import views

app_name = "skills"

# (route below p/<project>/, view), in matching order: the first route that matches wins.
PAGES = [
    ("review/", views.review_queue),
    ("review/<int:revision_id>/", views.revision_detail),
    ("review/<int:revision_id>/approve/", views.revision_approve),
    ("review/<int:revision_id>/reject/", views.revision_reject),
    ("review/<int:revision_id>/edit/", views.revision_edit),
    ("versions/", views.version_list),
    ("versions/diff/", views.version_diff),
    ("versions/new/", views.version_compose),
    ("versions/<int:number>/", views.version_detail),
    ("versions/<int:number>/promote/", views.version_promote),
    ("versions/<int:number>/rollback/", views.version_rollback),
    ("versions/<int:number>/reject/", views.version_reject),
    ("versions/<int:number>/replay-gate/", gate_views.replay_gate_panel),
    ("versions/<int:number>/replay-gate/run/", gate_views.replay_gate_run),
    ("canary/", canary_views.canary_panel),
    ("canary/start/", canary_views.canary_start),
    ("canary/stop/", canary_views.canary_stop),
    ("canary/promote/", canary_views.canary_promote),
    ("skills/", views.skill_library),
    ("skills/import/", skillmd_views.skill_import),
    ("skills/import/<str:import_id>/progress/", skillmd_views.skill_import_progress),
    ("groups/<int:group_id>/retry-synthesis/", synthesis_views.group_retry_synthesis),
    ("review/<int:revision_id>/effectiveness/", effectiveness_views.revision_effectiveness),
    ("versions/<int:number>/effectiveness/", effectiveness_views.version_effectiveness),
    ("groups/<int:group_id>/effectiveness/", effectiveness_views.group_effectiveness),
]

urlpatterns = [
    path(f"p/<slug:project_slug>/{route}", view, name=view.__name__) for route, view in PAGES
]
