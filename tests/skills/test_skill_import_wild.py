"""Skill libraries from the wild: real repositories' zips (tests/fixtures/skills_wild, see its
README for their source and licences) import file by file with the files beside each SKILL.md,
and export back byte for byte; the limits are the Agent Skills specification's; an import is
announced once; the import route takes a repository-sized body."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
from django.core import mail
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from base.models import Project
from skills.approvals.models import Notification
from skills.library.models import SkillFile, SkillRevision
from tests import factories
from tests.fakes.slack_server import SlackFake

pytestmark = pytest.mark.django_db

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "skills_wild"
ANTHROPIC = (FIXTURES / "anthropics-skills-subset.zip").read_bytes()
SUPERPOWERS = (FIXTURES / "superpowers-subset.zip").read_bytes()
IMPORT = "/api/v1/skills/import"


def post_zip(api, key: str, data: bytes, query: str = ""):
    return api.client.post(
        IMPORT + query,
        data=data,
        content_type="application/zip",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )


def unzip(data: bytes) -> dict[str, tuple[bytes, bool]]:
    """path -> (content, executable) for every file in a zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {
            info.filename: (archive.read(info), bool((info.external_attr >> 16) & 0o111))
            for info in archive.infolist()
            if not info.is_dir()
        }


def make_zip(files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, content in files.items():
            info = zipfile.ZipInfo(path, date_time=(2026, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = (modes or {}).get(path, 0o100644) << 16
            archive.writestr(info, content)
    return buffer.getvalue()


def exported_as(report: dict, original: dict[str, tuple[bytes, bool]]) -> dict[str, str]:
    """For every imported file of ``original``, the path its skill's export gives it."""
    folders = {
        s["path"].removesuffix("SKILL.md"): f"skills/{s['slug']}/"
        for s in report["skills"]
        if s["outcome"] != "refused"
    }
    paths = {}
    for item in report["files"]:
        if item["outcome"] in ("created", "unchanged", "kept"):
            folder = max((f for f in folders if item["path"].startswith(f)), key=len)
            paths[item["path"]] = folders[folder] + item["path"][len(folder) :]
    assert set(paths) <= set(original)
    return paths


# --- A real repository, whole --------------------------------------------------------------


def test_a_real_skills_repository_imports_file_by_file_and_exports_back_byte_for_byte(
    api, project, admin_key
):
    response = post_zip(api, admin_key, ANTHROPIC)

    assert response.status_code == 201, response.content
    report = response.json()
    original = unzip(ANTHROPIC)
    # Every file of the archive is accounted for, once.
    assert sorted(f["path"] for f in report["files"]) == sorted(original)
    outcomes = {f["path"].removeprefix("skills-main/skills/"): f for f in report["files"]}
    assert (report["created"], report["unchanged"], report["refused"]) == (3, 0, 3)
    slugs = {s["slug"]: s for s in report["skills"] if s["outcome"] == "created"}
    assert sorted(slugs) == ["mcp-builder", "theme-factory", "webapp-testing"]
    assert slugs["mcp-builder"]["files"] == 9 and slugs["mcp-builder"]["ignored_keys"] == [
        "license"
    ]
    # claude-api's multi-line description is 1,068 characters: over the specification's 1,024.
    refused = outcomes["claude-api/SKILL.md"]
    assert refused["outcome"] == "refused"
    assert "1,068" in refused["reason"] and "1,024" in refused["reason"]
    for name in ("claude-api/LICENSE.txt", "claude-api/shared/models.md"):
        assert outcomes[name]["outcome"] == "refused"
        assert "SKILL.md was refused" in outcomes[name]["reason"]
    assert outcomes["theme-factory/theme-showcase.pdf"]["outcome"] == "kept"
    assert outcomes["theme-factory/theme-showcase.pdf"]["skill"] == "theme-factory"
    assert SkillFile.objects.count() == sum(f["outcome"] == "kept" for f in report["files"]) == 26
    pdf = SkillFile.objects.get(path="theme-showcase.pdf")
    assert bytes(pdf.content) == original["skills-main/skills/theme-factory/theme-showcase.pdf"][0]
    assert pdf.content[:5] == b"%PDF-" and pdf.size == 124310

    exported = unzip(api.get("/api/v1/skills/export", key=admin_key).content)

    paths = exported_as(report, original)
    assert len(exported) == len(paths) == 3 + 26
    for source, target in paths.items():
        assert exported[target] == original[source], source  # bytes and the executable bit
    assert exported["skills/webapp-testing/scripts/with_server.py"][1] is True
    assert b"license: Complete terms in LICENSE.txt" in exported["skills/mcp-builder/SKILL.md"][0]


def test_an_exported_library_imports_elsewhere_and_exports_the_same_zip(
    api, project, other_project, admin_key
):
    assert post_zip(api, admin_key, ANTHROPIC).status_code == 201
    assert post_zip(api, admin_key, SUPERPOWERS).status_code == 201
    exported = api.get("/api/v1/skills/export", key=admin_key).content
    other_key = factories.make_key(other_project, scopes=["admin"])

    response = post_zip(api, other_key, exported)

    assert response.status_code == 201
    assert (response.json()["created"], response.json()["refused"]) == (6, 0)
    assert api.get("/api/v1/skills/export", key=other_key).content == exported


def test_importing_the_same_repository_again_changes_nothing(api, project, admin_key):
    post_zip(api, admin_key, SUPERPOWERS)
    revisions, files = SkillRevision.objects.count(), SkillFile.objects.count()

    response = post_zip(api, admin_key, SUPERPOWERS)

    assert response.status_code == 200
    assert (response.json()["created"], response.json()["unchanged"]) == (0, 3)
    assert {f["outcome"] for f in response.json()["files"]} == {"unchanged", "ignored"}
    assert (SkillRevision.objects.count(), SkillFile.objects.count()) == (revisions, files)


def test_a_form_upload_imports_too_and_its_all_or_nothing_field_is_honoured(
    client, project, admin_key
):
    def upload(data: bytes, **fields: str):
        return client.post(
            IMPORT,
            {"file": SimpleUploadedFile("skills.zip", data, "application/zip"), **fields},
            HTTP_AUTHORIZATION=f"Bearer {admin_key}",
        )

    assert upload(ANTHROPIC, all_or_nothing="true").status_code == 422
    assert not SkillRevision.objects.exists()
    response = upload(ANTHROPIC)
    assert response.status_code == 201
    assert response.json()["created"] == 3


def test_files_outside_any_skill_folder_are_reported_as_ignored(api, project, admin_key):
    report = post_zip(api, admin_key, SUPERPOWERS).json()

    ignored = {f["path"]: f["reason"] for f in report["files"] if f["outcome"] == "ignored"}
    assert sorted(ignored) == ["superpowers-main/LICENSE", "superpowers-main/README.md"]
    assert all("not inside a skill" in reason for reason in ignored.values())
    scripts = SkillFile.objects.filter(path__startswith="scripts/", executable=True)
    assert sorted(scripts.values_list("path", flat=True)) == [
        "scripts/review-package",
        "scripts/sdd-workspace",
        "scripts/task-brief",
    ]


def test_all_or_nothing_refuses_the_whole_import_naming_every_refused_file(api, project, admin_key):
    response = post_zip(api, admin_key, ANTHROPIC, "?all_or_nothing=true")

    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "refused"
    assert sorted(e["field"] for e in body["errors"]) == [
        "skills-main/skills/claude-api/LICENSE.txt",
        "skills-main/skills/claude-api/SKILL.md",
        "skills-main/skills/claude-api/shared/models.md",
    ]
    assert "1,068" in body["detail"]
    assert not SkillRevision.objects.exists() and not SkillFile.objects.exists()


# --- Byte for byte --------------------------------------------------------------------------

SENTENCE = "Use when a customer disputes a charge, asks for a refund, or reports a double payment."
LONG = "\n".join([SENTENCE] * 9)  # a multi-line description, as claude-api's
BLOCK = "".join(f"  {SENTENCE}\n" for _ in range(9))
REFUNDS = f"""---
name: refund-disputes
description: |-
{BLOCK}license: Apache-2.0
allowed-tools: Bash(git:*) Read
metadata:
  author: support-team
  version: "2.1"
  owners:
    - name: Ana
      team: payments
  x-review: {{cadence: monthly, since: 2026-01-01}}
---

# Refund disputes

Read [the policy](references/policy.md) first, then run `scripts/check.py`.
"""


def test_a_long_multi_line_description_and_nested_metadata_round_trip_byte_for_byte(
    api, project, admin_key
):
    assert 500 < len(LONG) <= 1024
    files = {
        "lib/refund-disputes/SKILL.md": REFUNDS,
        "lib/refund-disputes/references/policy.md": "Refunds within 30 days.\r\n",
        "lib/refund-disputes/scripts/check.py": "#!/usr/bin/env python3\nprint('ok')\n",
        "lib/refund-disputes/assets/logo.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    }
    data = make_zip(files, {"lib/refund-disputes/scripts/check.py": 0o100755})

    response = post_zip(api, admin_key, data)

    assert response.status_code == 201, response.content
    revision = SkillRevision.objects.get()
    assert revision.description == LONG
    exported = unzip(api.get("/api/v1/skills/export", key=admin_key).content)
    assert exported["skills/refund-disputes/SKILL.md"] == (REFUNDS.encode(), False)
    for path, content in files.items():
        target = path.replace("lib/", "skills/")
        expected = content.encode() if isinstance(content, str) else content
        assert exported[target][0] == expected
    assert exported["skills/refund-disputes/scripts/check.py"][1] is True


def test_an_edited_revision_keeps_its_files_and_the_front_matter_it_does_not_change(
    api, project, admin_key
):
    post_zip(
        api,
        admin_key,
        make_zip(
            {
                "refund-disputes/SKILL.md": REFUNDS,
                "refund-disputes/references/policy.md": "Refunds within 30 days.\n",
            }
        ),
    )
    imported = SkillRevision.objects.get()

    response = api.post(
        f"/api/v1/skills/revisions/{imported.pk}/edit",
        {
            "name": imported.name,
            "description": "Use when a customer disputes a charge.",
            "instructions": imported.instructions + "\n\nAlways cite the order number.",
        },
        key=admin_key,
    )

    assert response.status_code == 201, response.content
    edited = SkillRevision.objects.get(number=2)
    assert list(edited.files.values_list("path", "content")) == [
        ("references/policy.md", b"Refunds within 30 days.\n")
    ]
    exported = unzip(api.get("/api/v1/skills/export", key=admin_key).content)
    text = exported["skills/refund-disputes/SKILL.md"][0].decode()
    assert "description: Use when a customer disputes a charge.\n" in text
    assert "allowed-tools: Bash(git:*) Read" in text and "team: payments" in text
    assert text.endswith("Always cite the order number.\n")
    assert exported["skills/refund-disputes/references/policy.md"][0] == (
        b"Refunds within 30 days.\n"
    )


# --- Refusals, file by file -----------------------------------------------------------------


def test_each_refusal_is_reported_and_the_rest_imports(api, project, admin_key, settings):
    settings.METACLAW = {**settings.METACLAW, "SKILL_FILE_MAX_BYTES": 4000}
    too_long = REFUNDS.replace("refund-disputes", "too-long").replace(BLOCK, BLOCK * 2)
    data = make_zip(
        {
            "a/refund-disputes/SKILL.md": REFUNDS,
            "a/refund-disputes/assets/big.bin": os.urandom(5000),
            "a/refund-disputes/scripts/link": "../../../etc/passwd",
            "a/too-long/SKILL.md": too_long,
            "a/too-long/notes.md": "notes",
            "a/not-utf8/SKILL.md": b"---\nname: x\ndescription: \xff\n---\nbody\n",
            "a/twin/SKILL.md": REFUNDS,
            "a/refund-disputes/nested/SKILL.md": "../SKILL.md",
            "a/refund-disputes/nested/notes.md": "not the outer skill's",
        },
        {"a/refund-disputes/scripts/link": 0o120777, "a/refund-disputes/nested/SKILL.md": 0o120777},
    )

    response = post_zip(api, admin_key, data)

    assert response.status_code == 201, response.content
    body = response.json()
    reasons = {f["path"]: f["reason"] for f in body["files"] if f["outcome"] == "refused"}
    assert "5,000 bytes; the limit per file is 4,000" in reasons["a/refund-disputes/assets/big.bin"]
    assert "symbolic link" in reasons["a/refund-disputes/scripts/link"]
    assert "description" in reasons["a/too-long/SKILL.md"]
    assert "SKILL.md was refused" in reasons["a/too-long/notes.md"]
    assert "UTF-8" in reasons["a/not-utf8/SKILL.md"]
    assert "also in a/refund-disputes/SKILL.md" in reasons["a/twin/SKILL.md"]
    assert "SKILL.md was refused" in reasons["a/refund-disputes/nested/notes.md"]
    assert body["refused"] == len(reasons) == 8
    assert SkillRevision.objects.get().skill.slug == "refund-disputes"
    assert not SkillFile.objects.exists()


def test_a_library_with_no_importable_skill_answers_422_with_the_report(api, project, admin_key):
    data = make_zip({"x/SKILL.md": "no front matter", "x/run.sh": "echo hi"})

    response = post_zip(api, admin_key, data)

    assert response.status_code == 422
    assert {e["field"] for e in response.json()["errors"]} == {"x/SKILL.md", "x/run.sh"}
    assert not SkillRevision.objects.exists()


# --- The request body -----------------------------------------------------------------------


def test_the_import_route_takes_a_repository_sized_zip_past_the_api_body_limit(
    api, project, admin_key, settings
):
    # Past the API's 1 MiB and Django's in-memory limit (DATA_UPLOAD_MAX_MEMORY_SIZE).
    size = settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1024 * 1024
    data = make_zip(
        {"big/SKILL.md": REFUNDS.replace("refund-disputes", "big"), "big/a.bin": os.urandom(size)}
    )
    assert len(data) > size

    response = post_zip(api, admin_key, data)

    assert response.status_code == 201, response.content
    assert SkillFile.objects.get().size == size


def test_past_the_import_limit_answers_413_and_other_routes_keep_their_limit(
    api, project, admin_key, settings
):
    settings.METACLAW = {**settings.METACLAW, "SKILL_IMPORT_MAX_BYTES": 3 * 1024 * 1024}
    data = make_zip({"big/SKILL.md": REFUNDS, "big/a.bin": os.urandom(3 * 1024 * 1024 + 10)})

    response = post_zip(api, admin_key, data)

    assert response.status_code == 413
    assert response.json()["limit_bytes"] == 3 * 1024 * 1024
    two_mib = api.post("/api/v1/incidents", {"pad": "x" * (2 * 1024 * 1024)}, key=admin_key)
    assert two_mib.status_code == 413
    assert not SkillRevision.objects.exists()


# --- One digest per import ------------------------------------------------------------------


@pytest.fixture
def slack():
    with SlackFake(webhook_secret="whsec-test") as fake:
        yield fake


def _reviewers(project: Project, slack: SlackFake) -> None:
    Project.objects.filter(pk=project.pk).update(
        slack_webhook_url=slack.webhook_url, notify_emails="team@example.com"
    )
    for name in ("rita", "rob"):
        user = factories.make_member(project, "reviewer", name)
        user.email = f"{name}@example.com"
        user.save(update_fields=["email"])


def test_an_import_is_announced_once_to_each_reviewer_and_channel(
    api, project, admin_key, slack, django_capture_on_commit_callbacks
):
    _reviewers(project, slack)

    with django_capture_on_commit_callbacks(execute=True):
        response = post_zip(api, admin_key, ANTHROPIC)

    assert response.status_code == 201
    assert sorted(m.to[0] for m in mail.outbox) == [
        "rita@example.com",
        "rob@example.com",
        "team@example.com",
    ]
    message = mail.outbox[0]
    assert "3 imported skill(s) await review" in message.subject
    for slug in ("mcp-builder", "theme-factory", "webapp-testing"):
        assert slug in message.body
    assert f"/p/{project.slug}/review/" in message.body
    (posted,) = slack.of("webhook")
    assert "3 imported skill(s)" in posted.json["text"]
    assert Notification.objects.filter(revision__isnull=False).count() == 0


def test_without_a_mail_server_nothing_is_mailed_and_slack_still_is(
    api, project, admin_key, slack, settings, django_capture_on_commit_callbacks
):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = ""
    _reviewers(project, slack)

    with django_capture_on_commit_callbacks(execute=True):
        post_zip(api, admin_key, SUPERPOWERS)
        factories.make_llm_revision(project)  # a single proposal too

    assert not Notification.objects.filter(channel="email").exists()
    assert mail.outbox == []
    assert len(slack.of("webhook")) == 2


# --- The management commands ---------------------------------------------------------------


def test_the_commands_report_every_refusal_and_round_trip_a_repository_folder(
    project, other_project, tmp_path
):
    source = tmp_path / "source"
    with zipfile.ZipFile(io.BytesIO(ANTHROPIC)) as archive:
        archive.extractall(source)
    (source / "skills-main/skills/webapp-testing/scripts/with_server.py").chmod(0o755)
    out = io.StringIO()

    call_command("import_skills", str(source), project=project.slug, stdout=out)

    printed = out.getvalue()
    assert "refused   skills-main/skills/claude-api/SKILL.md: The description is 1,068" in printed
    assert "created   theme-factory r1, 12 file(s)" in printed
    assert printed.rstrip().endswith(
        "Imported 3 new revision(s) with 26 bundled file(s); 0 unchanged; 3 file(s) refused."
    )
    call_command("export_skills", str(tmp_path / "out"), project=project.slug, stdout=io.StringIO())
    pdf = tmp_path / "out/skills/theme-factory/theme-showcase.pdf"
    assert (
        pdf.read_bytes()
        == (source / "skills-main/skills/theme-factory/theme-showcase.pdf").read_bytes()
    )
    assert os.access(tmp_path / "out/skills/webapp-testing/scripts/with_server.py", os.X_OK)
    with pytest.raises(CommandError, match="nothing was imported"):
        call_command(
            "import_skills",
            str(source),
            project=other_project.slug,
            all_or_nothing=True,
            stdout=io.StringIO(),
        )
    assert not SkillRevision.objects.filter(skill__project=other_project).exists()
