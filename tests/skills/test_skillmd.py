"""SKILL.md libraries: import and export through the API and the manage.py commands."""

from __future__ import annotations

import io
import zipfile

import pytest
from django.core.management import call_command

from base.errors import DomainError
from skills.library.models import Origin, RevisionStatus, SkillRevision
from skills.skillmd import services as skillmd
from skills.versions.services import skill_revision_approve
from tests import factories

pytestmark = pytest.mark.django_db

FOREIGN = """---
name: debug-systematically
description: When a bug resists the first fix, use it to narrow the cause step by step.
category: coding
license: MIT
---

# Debug systematically

1. Reproduce the failure.
2. Bisect: halve the search space each step.
"""


def _library(project):
    approved = factories.make_revision(
        project,
        "iso-dates",
        name="ISO dates for order search",
        description="When calling search_orders with a date: the user's words: 'last week'.",
        instructions="Convert relative dates to ISO 8601.\n\n- Never pass `last week`.\n",
        category="common_mistakes",
        examples=["'last week' → 2026-11-18", {"input": "yesterday", "since": "2026-11-24"}],
        origin=Origin.LIVE_LLM,
    )
    skill_revision_approve(revision=approved, actor=None, actor_label="test")
    factories.make_revision(
        project,
        "chart-units",
        name="chart-units",
        description="When plotting any chart for a user.",
        instructions="Label both axes with units (e.g. *users, thousands*).",
        category="data_analysis",
        origin=Origin.HUMAN,
        author="human",
    )
    rejected = factories.make_revision(
        project,
        "bad-idea",
        name="Bad",
        description="Never.",
        instructions="Nope.",
        origin=Origin.HUMAN,
        author="human",
    )
    SkillRevision.objects.filter(pk=rejected.pk).update(status=RevisionStatus.REJECTED)


def _zip_files(data: bytes) -> dict[str, str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name).decode() for name in archive.namelist()}


def test_export_writes_one_skill_md_per_standing_skill(api, project, admin_key):
    _library(project)

    response = api.get("/api/v1/skills/export", key=admin_key)

    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    files = _zip_files(response.content)
    assert sorted(files) == ["skills/chart-units/SKILL.md", "skills/iso-dates/SKILL.md"]
    text = files["skills/iso-dates/SKILL.md"]
    assert text.startswith("---\nname: iso-dates\ndescription: ")
    assert "category: common_mistakes" in text
    assert "title: ISO dates for order search" in text
    assert text.rstrip().endswith("- Never pass `last week`.")

    approved_only = _zip_files(
        api.get("/api/v1/skills/export", key=admin_key, include_pending="false").content
    )
    assert sorted(approved_only) == ["skills/iso-dates/SKILL.md"]


def test_an_exported_library_imports_into_another_project_without_losing_anything(
    api, project, other_project, admin_key
):
    _library(project)
    exported = api.get("/api/v1/skills/export", key=admin_key).content
    other_key = factories.make_key(other_project, scopes=["admin"])

    response = api.client.post(
        "/api/v1/skills/import",
        data=exported,
        content_type="application/zip",
        HTTP_AUTHORIZATION=f"Bearer {other_key}",
    )

    assert response.status_code == 201, response.content
    assert response.json()["created"] == 2
    for original in SkillRevision.objects.filter(
        skill__project=project, status__in=["approved", "proposed"]
    ):
        copy = SkillRevision.objects.get(
            skill__project=other_project, skill__slug=original.skill.slug
        )
        assert copy.origin == Origin.IMPORT and copy.status == RevisionStatus.PROPOSED
        for name in ("name", "description", "instructions", "category", "examples"):
            assert getattr(copy, name) == getattr(original, name), name
    # ...and exporting the copy gives the same files back.
    again = api.get("/api/v1/skills/export", key=other_key).content
    assert _zip_files(again) == _zip_files(exported)


def test_importing_the_same_library_again_changes_nothing(api, project, admin_key):
    _library(project)
    exported = api.get("/api/v1/skills/export", key=admin_key).content
    before = SkillRevision.objects.count()

    response = api.client.post(
        "/api/v1/skills/import",
        data=exported,
        content_type="application/zip",
        HTTP_AUTHORIZATION=f"Bearer {admin_key}",
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["created"], body["unchanged"], body["refused"]) == (0, 2, 0)
    assert {f["outcome"] for f in body["files"]} == {"unchanged"}
    assert SkillRevision.objects.count() == before


def test_a_changed_skill_md_becomes_a_new_revision_of_that_skill(api, project, admin_key):
    _library(project)
    text = skillmd.library_export(project)["skills/iso-dates/SKILL.md"]

    response = api.post(
        "/api/v1/skills/import",
        {"skills": [{"path": "x/SKILL.md", "content": text.replace("ISO 8601", "YYYY-MM-DD")}]},
        key=admin_key,
    )

    assert response.status_code == 201
    new = SkillRevision.objects.get(skill__slug="iso-dates", number=2)
    assert "YYYY-MM-DD" in new.instructions
    assert new.parent.number == 1


def test_a_foreign_skill_md_imports_and_its_unknown_keys_are_reported(api, project, admin_key):
    response = api.post(
        "/api/v1/skills/import", {"files": {"skills/debug/SKILL.md": FOREIGN}}, key=admin_key
    )

    assert response.status_code == 201
    (item,) = response.json()["skills"]
    assert item["slug"] == "debug-systematically"
    assert item["ignored_keys"] == ["license"]
    revision = SkillRevision.objects.get()
    assert revision.category == "coding"
    assert revision.instructions.startswith("# Debug systematically")


def test_all_or_nothing_an_invalid_file_answers_422_naming_it_and_imports_nothing(
    api, project, admin_key
):
    broken = FOREIGN.replace("category: coding", "category: astrology")

    response = api.post(
        "/api/v1/skills/import",
        {
            "files": {
                "skills/ok/SKILL.md": FOREIGN.replace("debug-", "ok-"),
                "skills/bad/SKILL.md": broken,
            },
            "all_or_nothing": True,
        },
        key=admin_key,
    )

    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "skills/bad/SKILL.md"
    assert "astrology" in response.json()["detail"]
    assert not SkillRevision.objects.exists()


def test_missing_front_matter_is_refused(api, project, admin_key):
    response = api.post(
        "/api/v1/skills/import", {"files": {"a/SKILL.md": "# just markdown"}}, key=admin_key
    )
    assert response.status_code == 422
    assert "front matter" in response.json()["detail"]


def test_import_and_export_need_an_admin_key(api, project, ingest_key):
    assert api.get("/api/v1/skills/export", key=ingest_key).status_code == 403
    response = api.post("/api/v1/skills/import", {"files": {"a/SKILL.md": FOREIGN}}, key=ingest_key)
    assert response.status_code == 403
    assert not SkillRevision.objects.exists()


def test_the_management_commands_round_trip_a_folder_library(project, other_project, tmp_path):
    _library(project)

    call_command("export_skills", str(tmp_path / "lib"), project=project.slug, stdout=io.StringIO())
    assert (tmp_path / "lib/skills/iso-dates/SKILL.md").exists()
    (tmp_path / "lib/skills/debug/SKILL.md").parent.mkdir()
    (tmp_path / "lib/skills/debug/SKILL.md").write_text(FOREIGN)
    out = io.StringIO()
    call_command("import_skills", str(tmp_path / "lib"), project=other_project.slug, stdout=out)

    assert "Imported 3 new revision(s)" in out.getvalue()
    call_command(
        "export_skills",
        str(tmp_path / "copy.zip"),
        project=other_project.slug,
        stdout=io.StringIO(),
    )
    files = _zip_files((tmp_path / "copy.zip").read_bytes())
    assert (
        files["skills/iso-dates/SKILL.md"]
        == (tmp_path / "lib/skills/iso-dates/SKILL.md").read_text()
    )


# --- Damaged archives -----------------------------------------------------------------------


def _patched_zip(*, compression: int = zipfile.ZIP_STORED, patch=None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr("skills/debug/SKILL.md", FOREIGN * 4)
    data = bytearray(buffer.getvalue())
    if patch is not None:
        patch(data)
    return bytes(data)


def _flip_content_byte(data: bytearray) -> None:
    data[30 + len("skills/debug/SKILL.md") + 40] ^= 0xFF  # inside the first entry's data


def _set_central(offset: int, value: bytes):
    def patch(data: bytearray) -> None:
        at = data.index(b"PK\x01\x02") + offset
        data[at : at + len(value)] = value

    return patch


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_patched_zip(patch=_flip_content_byte), id="bad-crc"),
        pytest.param(
            _patched_zip(compression=zipfile.ZIP_DEFLATED, patch=_flip_content_byte),
            id="corrupt-deflate",
        ),
        pytest.param(_patched_zip(patch=_set_central(8, b"\x01\x00")), id="encrypted"),
        pytest.param(_patched_zip(patch=_set_central(10, b"\x63\x00")), id="unknown-method"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 40, id="truncated"),
    ],
)
def test_a_damaged_archive_is_refused_naming_the_file_field(data):
    with pytest.raises(DomainError) as refused:
        skillmd.read_zip(data)
    assert refused.value.field == "file"


def test_a_damaged_archive_upload_answers_a_client_error_not_a_server_error(
    api, project, admin_key
):
    response = api.client.post(
        "/api/v1/skills/import",
        data=_patched_zip(patch=_set_central(8, b"\x01\x00")),
        content_type="application/zip",
        HTTP_AUTHORIZATION=f"Bearer {admin_key}",
    )

    assert 400 <= response.status_code < 500, response.content
    assert "file" in response.content.decode()
    assert not SkillRevision.objects.exists()
