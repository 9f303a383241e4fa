"""A new project, however it is made, starts with its first policy version: v1, empty, active."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from base.models import AuditEvent, Project
from metaclaw_site.projects import project_create
from skills.versions.models import PolicyVersion, Release, VersionStatus
from tests import factories

pytestmark = pytest.mark.django_db


def _first_version(project: Project) -> PolicyVersion:
    (version,) = PolicyVersion.objects.filter(project=project)
    return version


def test_a_new_project_has_an_active_empty_v1_and_an_audit_trail():
    project = project_create(name="Support agents")

    version = _first_version(project)
    assert (version.number, version.status) == (1, VersionStatus.ACTIVE)
    assert not version.revisions.exists()
    assert Release.objects.filter(project=project, to_version=version).count() == 1
    assert set(AuditEvent.objects.filter(project=project).values_list("action", flat=True)) == {
        "project.create",
        "policy_version.create",
    }


def test_a_refused_project_leaves_nothing_behind():
    project_create(name="Support agents")

    with pytest.raises(Exception, match="exists already"):
        project_create(name="Support agents")

    assert Project.objects.count() == 1
    assert PolicyVersion.objects.count() == 1


def test_the_create_project_command_makes_a_project_with_its_v1():
    owner = factories.make_user("owner")
    out = StringIO()

    call_command("create_project", "Billing bots", "--owner", "owner", stdout=out)

    project = Project.objects.get(slug="billing-bots")
    assert _first_version(project).status == VersionStatus.ACTIVE
    assert project.memberships.get(user=owner).role == "admin"
    with pytest.raises(CommandError, match="No user"):
        call_command("create_project", "Other", "--owner", "nobody", stdout=out)


def test_a_project_added_in_djangos_admin_gets_its_v1(rf):
    from django.contrib import admin

    model_admin = admin.site._registry[Project]
    request = rf.post("/admin/metaclaw_site/project/add/")
    request.user = get_user_model().objects.create_superuser("root", "r@example.com", "pw-123456")
    project = Project(name="Admin-made", slug="admin-made")

    model_admin.save_model(request, project, form=None, change=False)
    model_admin.save_model(request, project, form=None, change=True)  # an edit adds nothing

    assert _first_version(Project.objects.get(slug="admin-made")).number == 1
