"""Admin API for the skill library: SKILL.md import and export.

Thin handlers over ``skills.skillmd.services``; ``admin`` keys only. The key's project scopes
everything; the actor is the key (``api-key:<prefix>``). The import route takes a body up to
``METACLAW["SKILL_IMPORT_MAX_BYTES"]`` (a whole repository's zip; ``ApiBodyLimitMiddleware``
answers 413 past it) and reads it as a stream, past Django's in-memory limit."""

from __future__ import annotations

import json

from django.conf import settings
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
    reason: str
    files: int


class FileOutcomeOut(Schema):
    path: str
    outcome: str
    skill: str
    reason: str
    size: int | None


class ImportOut(Schema):
    created: int
    unchanged: int
    refused: int
    skills: list[ImportedSkillOut]
    files: list[FileOutcomeOut]


class ImportErrorOut(Schema):
    detail: str
    code: str
    errors: list[dict]
    files: list[FileOutcomeOut]


_ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")


def _body(request: HttpRequest) -> bytes:
    # A stream read: request.body would refuse anything past DATA_UPLOAD_MAX_MEMORY_SIZE.
    limit = int(settings.METACLAW["SKILL_IMPORT_MAX_BYTES"])
    data = request.read(limit + 1)
    if len(data) > limit:
        raise DomainError(f"The upload is larger than {limit:,} bytes.", field="file")
    return data


def _entries_from_request(request: HttpRequest) -> tuple[list[skillmd.Entry], bool]:
    """The files sent, and whether the JSON body asks for all or nothing."""
    content_type = (request.content_type or "").lower()
    if content_type == "multipart/form-data":
        upload = request.FILES.get("file")
        if upload is None:
            raise DomainError("Upload the zip as the form field 'file'.", field="file")
        all_or_nothing = request.POST.get("all_or_nothing", "") in ("1", "true", "on")
        return skillmd.read_zip(upload.read()), all_or_nothing
    if content_type in _ZIP_TYPES:
        return skillmd.read_zip(_body(request)), False
    try:
        body = json.loads(_body(request) or b"null")
    except ValueError as exc:
        raise DomainError("The body is neither a zip nor JSON.", field="body") from exc
    all_or_nothing = bool(isinstance(body, dict) and body.get("all_or_nothing"))
    # {"files": {"skills/x/SKILL.md": "..."}} or {"skills": [{"path": ..., "content": ...}]}
    if isinstance(body, dict) and isinstance(body.get("files"), dict):
        files = {str(k): str(v) for k, v in body["files"].items()}
        return skillmd.entries_from_texts(files), all_or_nothing
    if isinstance(body, dict) and isinstance(body.get("skills"), list):
        files = {}
        for index, item in enumerate(body["skills"]):
            if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                raise DomainError(
                    "Each skill needs 'content' (the SKILL.md text).",
                    field=f"skills.{index}.content",
                )
            files[str(item.get("path") or f"{index}/{skillmd.FILE_NAME}")] = item["content"]
        return skillmd.entries_from_texts(files), all_or_nothing
    raise DomainError(
        'Send a zip, or JSON {"files": {path: text}} or {"skills": [{"path", "content"}]}.',
        field="body",
    )


def _files_out(report: skillmd.ImportReport) -> list[FileOutcomeOut]:
    return [FileOutcomeOut(**vars(f)) for f in report.files]


@router.post(
    "/skills/import",
    response={200: ImportOut, 201: ImportOut, 422: ImportErrorOut},
    summary="Import SKILL.md folders (a zip, or JSON) as proposed revisions, file by file",
)
def import_library(request: ApiRequest, all_or_nothing: bool = False):
    """Every file is reported: a SKILL.md created, unchanged or refused; a file beside one kept,
    unchanged or refused; anything else ignored, each refusal with its reason. A refused file
    leaves the rest importing; ``all_or_nothing`` (query, form or JSON field) refuses the whole
    import instead (422, nothing written). 422 too when no skill could be imported."""
    entries, asked = _entries_from_request(request)
    try:
        report = skillmd.library_import(
            project=request.project,
            entries=entries,
            all_or_nothing=all_or_nothing or asked,
            actor_label=api_key_label(request.api_key),
        )
    except skillmd.ImportRefused as refused:
        return Status(422, _refusal(str(refused), refused.report))
    created, unchanged = report.count("created"), report.count("unchanged")
    if not created and not unchanged:
        return Status(422, _refusal("No skill could be imported.", report))
    body = ImportOut(
        created=created,
        unchanged=unchanged,
        refused=len(report.refusals),
        skills=[ImportedSkillOut(**vars(s)) for s in report.skills],
        files=_files_out(report),
    )
    return Status(201 if created else 200, body)


def _refusal(detail: str, report: skillmd.ImportReport) -> ImportErrorOut:
    errors = [{"field": f.path, "message": f.reason, "type": "refused"} for f in report.refusals]
    if len(report.refusals) == 1 and not detail.startswith(report.refusals[0].path):
        detail = f"{detail} {report.refusals[0].path}: {report.refusals[0].reason}"
    return ImportErrorOut(detail=detail, code="refused", errors=errors, files=_files_out(report))


@router.get(
    "/skills/export",
    summary="Export the skill library as a zip of SKILL.md folders with their bundled files",
)
def export_library(request: ApiRequest, include_pending: bool = True) -> HttpResponse:
    project = request.project
    files = skillmd.library_export(project, include_pending=include_pending)
    response = HttpResponse(
        skillmd.zip_bytes(files, files.executable), content_type="application/zip"
    )
    response["Content-Disposition"] = f'attachment; filename="{project.slug}-skills.zip"'
    return response
