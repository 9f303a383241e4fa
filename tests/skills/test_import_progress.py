"""The dashboard's SKILL.md import: an admin uploads a zip, the page shows the per-file report,
and while the upload imports a poll reads its progress ("N of M files") from another request,
stopping once the import has finished."""

from __future__ import annotations

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from base.models import Role
from skills.library.models import Origin, RevisionStatus, SkillFile, SkillRevision
from skills.skillmd import services as skillmd
from tests import factories
from tests.skills.test_skill_import_wild import make_zip

pytestmark = pytest.mark.django_db


def skill_md(slug: str) -> str:
    return (
        f"---\nname: {slug}\ndescription: When the user asks about {slug}.\n---\n\n"
        f"# {slug}\n\nDo the {slug} thing carefully.\n"
    )


# Three skills, two files beside the second, and one file outside any skill: six files.
LIBRARY = {
    "repo/skills/alpha/SKILL.md": skill_md("alpha"),
    "repo/skills/beta/SKILL.md": skill_md("beta"),
    "repo/skills/beta/scripts/run.py": "print('beta')\n",
    "repo/skills/beta/references/notes.md": "Notes.\n",
    "repo/skills/gamma/SKILL.md": skill_md("gamma"),
    "repo/README.md": "A library.\n",
}


def page_url(project) -> str:
    return reverse("skills:skill_import", kwargs={"project_slug": project.slug})


def progress_url(project, import_id: str) -> str:
    return reverse(
        "skills:skill_import_progress",
        kwargs={"project_slug": project.slug, "import_id": import_id},
    )


def upload(data: bytes, name: str = "library.zip") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="application/zip")


@pytest.fixture
def admin_client(client, project):
    client.force_login(factories.make_member(project, Role.ADMIN))
    return client


def test_the_progress_callback_counts_up_to_every_file_of_the_archive(project):
    heard: list[tuple[int, int, str]] = []

    report = skillmd.library_import(
        project=project,
        entries=skillmd.read_zip(make_zip(LIBRARY)),
        actor_label="test",
        progress=lambda done, total, current: heard.append((done, total, current)),
    )

    assert report.count("created") == 3
    assert {total for _, total, _ in heard} == {6}
    counts = [done for done, _, _ in heard]
    assert counts == sorted(counts) and counts[0] < counts[-1] == 6
    # The README is settled before any write; then alpha (1 file), beta (3), gamma (1).
    assert heard[:4] == [
        (1, 6, ""),
        (2, 6, "repo/skills/alpha/SKILL.md"),
        (5, 6, "repo/skills/beta/SKILL.md"),
        (6, 6, "repo/skills/gamma/SKILL.md"),
    ]


def test_the_partial_shows_an_import_under_way_then_stops_polling_when_it_finished(
    admin_client, project
):
    import_id = "0123456789abcdef0123456789abcdef"
    url = progress_url(project, import_id)
    record = skillmd.import_progress_recorder(project, import_id)
    seen: list[str] = []

    def progress(done: int, total: int, current: str) -> None:
        record(done, total, current)
        # Another request, while the import is still inside its transaction.
        if current == "repo/skills/beta/SKILL.md":
            seen.append(admin_client.get(url).content.decode())

    before = admin_client.get(url).content.decode()
    skillmd.library_import(
        project=project,
        entries=skillmd.read_zip(make_zip(LIBRARY)),
        actor_label="test",
        progress=progress,
    )

    assert 'data-import-state="waiting"' in before and "files" not in before
    [running] = seen
    assert "5 of 6 files" in running
    assert 'hx-trigger="every 1s"' in running
    assert "repo/skills/beta/SKILL.md" in running

    # The page's import marks it finished however it ends: the fragment stops polling.
    skillmd.library_import_tracked(
        project=project,
        import_id=import_id,
        entries=skillmd.read_zip(make_zip(LIBRARY)),
        actor_label="test",
    )
    finished = admin_client.get(url).content.decode()
    assert "6 of 6 files" in finished and "finished" in finished
    assert "hx-trigger" not in finished and "hx-get" not in finished


def test_the_page_imports_an_archive_and_shows_the_report(admin_client, project):
    page = admin_client.get(page_url(project))
    assert page.status_code == 200
    import_id = re.search(r'name="import_id" id="import-id" value="([0-9a-f]{32})"', page.text)[1]
    assert 'hx-encoding="multipart/form-data"' in page.text

    response = admin_client.post(
        page_url(project),
        {"file": upload(make_zip(LIBRARY)), "import_id": import_id},
        HTTP_HX_REQUEST="true",
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert re.search(r"data-report-created>3<", html)
    assert html.count('data-outcome="created"') == 3
    assert html.count('data-outcome="kept"') == 2
    assert html.count('data-outcome="ignored"') == 1
    assert "6 of 6 files" in html
    # The next upload gets a fresh id, swapped into the form out of band.
    next_id = re.search(r'id="import-id" value="([0-9a-f]{32})" hx-swap-oob="true"', html)[1]
    assert next_id != import_id
    revisions = SkillRevision.objects.filter(skill__project=project)
    assert sorted(revisions.values_list("skill__slug", flat=True)) == ["alpha", "beta", "gamma"]
    assert set(revisions.values_list("status", flat=True)) == {RevisionStatus.PROPOSED}
    assert set(revisions.values_list("origin", flat=True)) == {Origin.IMPORT}
    assert SkillFile.objects.filter(revision__skill__slug="beta").count() == 2
    finished = admin_client.get(progress_url(project, import_id)).content.decode()
    assert "6 of 6 files" in finished and "hx-trigger" not in finished


def test_the_library_page_links_to_the_import_for_admins_only(client, project):
    library = reverse("skills:skill_library", kwargs={"project_slug": project.slug})
    client.force_login(factories.make_member(project, Role.ADMIN))
    assert page_url(project) in client.get(library).content.decode()
    client.force_login(factories.make_member(project, Role.REVIEWER))
    assert page_url(project) not in client.get(library).content.decode()


@pytest.mark.parametrize("role", [Role.VIEWER, Role.REVIEWER])
def test_an_import_needs_the_admin_role(client, project, role):
    client.force_login(factories.make_member(project, role))

    assert client.get(page_url(project)).status_code == 403
    response = client.post(
        page_url(project), {"file": upload(make_zip(LIBRARY)), "import_id": "a" * 32}
    )
    assert response.status_code == 403
    assert client.get(progress_url(project, "a" * 32)).status_code == 403
    assert not SkillRevision.objects.filter(skill__project=project).exists()


def test_a_file_that_is_not_a_zip_is_a_form_error(admin_client, project):
    response = admin_client.post(
        page_url(project),
        {"file": upload(b"not a zip at all", "skills.txt"), "import_id": "b" * 32},
        HTTP_HX_REQUEST="true",
    )

    assert response.status_code == 422
    assert "The upload is not a zip archive." in response.content.decode()
    assert not SkillRevision.objects.filter(skill__project=project).exists()


def test_an_archive_without_skills_reports_why_and_stores_nothing(admin_client, project):
    response = admin_client.post(
        page_url(project),
        {"file": upload(make_zip({"README.md": "Hello.\n"})), "import_id": "c" * 32},
    )

    assert response.status_code == 422
    assert "No SKILL.md files found." in response.content.decode()
    assert not SkillRevision.objects.filter(skill__project=project).exists()


def test_a_missing_file_is_a_form_error(admin_client, project):
    response = admin_client.post(page_url(project), {"import_id": "d" * 32})

    assert response.status_code == 422
    assert "Zip archive: This field is required." in response.content.decode()
