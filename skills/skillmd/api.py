"""Admin API for the skill library: SKILL.md import and export.

Thin handlers over ``skills.skillmd.services``; ``admin`` keys only. The key's project scopes
everything; the actor is the key (``api-key:<prefix>``)."""

from __future__ import annotations

import json

from django.http import HttpRequest, HttpResponse
from ninja import Router, Schema, Status

from base.auth import admin_auth
from base.errors import DomainError
from base.permissions import api_key_label
from base.requests import ApiRequest
from skills.skillmd import services as skillmd

# Operation ids as before this module moved into skills.skillmd (see metaclaw_site.api).
OPENAPI_OPERATION_PREFIX = "skills_api_library"

router = Router(tags=["skill library"], auth=admin_auth)


class ImportedSkillOut(Schema):
    path: str
    slug: str
    outcome: str
    revision_id: int | None
    number: int | None
    ignored_keys: list[str]


class ImportOut(Schema):
    created: int
    unchanged: int
    skills: list[ImportedSkillOut]


def _files_from_request(request: HttpRequest) -> dict[str, str]:
    content_type = (request.content_type or "").lower()
    if content_type == "multipart/form-data":
        upload = request.FILES.get("file")
        if upload is None:
            raise DomainError("Upload the zip as the form field 'file'.", field="file")
        return skillmd.read_zip(upload.read())
    if content_type in (
        "application/zip",
        "application/x-zip-compressed",
        "application/octet-stream",
    ):
        return skillmd.read_zip(request.body)
    try:
        body = json.loads(request.body or b"null")
    except ValueError as exc:
        raise DomainError("The body is neither a zip nor JSON.", field="body") from exc
    # {"files": {"skills/x/SKILL.md": "..."}} or {"skills": [{"path": ..., "content": ...}]}
    if isinstance(body, dict) and isinstance(body.get("files"), dict):
        return {str(k): str(v) for k, v in body["files"].items()}
    if isinstance(body, dict) and isinstance(body.get("skills"), list):
        files: dict[str, str] = {}
        for index, item in enumerate(body["skills"]):
            if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                raise DomainError(
                    "Each skill needs 'content' (the SKILL.md text).",
                    field=f"skills.{index}.content",
                )
            files[str(item.get("path") or f"{index}/{skillmd.FILE_NAME}")] = item["content"]
        return files
    raise DomainError(
        'Send a zip, or JSON {"files": {path: text}} or {"skills": [{"path", "content"}]}.',
        field="body",
    )


@router.post(
    "/skills/import",
    response={200: ImportOut, 201: ImportOut},
    summary="Import SKILL.md files (a zip, or JSON) as proposed revisions",
)
def import_library(request: ApiRequest):
    """All or nothing: an invalid file answers 422 naming it and imports nothing. Skills whose
    standing revision already has the same content are reported as unchanged."""
    results = skillmd.library_import(
        project=request.project,
        files=_files_from_request(request),
        actor_label=api_key_label(request.api_key),
    )
    created = sum(r.outcome == "created" for r in results)
    body = ImportOut(
        created=created,
        unchanged=len(results) - created,
        skills=[ImportedSkillOut(**vars(r)) for r in results],
    )
    return Status(201 if created else 200, body)


@router.get("/skills/export", summary="Export the skill library as a zip of SKILL.md folders")
def export_library(request: ApiRequest, include_pending: bool = True) -> HttpResponse:
    project = request.project
    files = skillmd.library_export(project, include_pending=include_pending)
    response = HttpResponse(skillmd.zip_bytes(files), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{project.slug}-skills.zip"'
    return response
