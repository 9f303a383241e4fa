"""The dashboard's SKILL.md import: an upload form, the per-file report, and the progress
partial the page polls while the upload's request imports. Thin: ``skills.skillmd.services``
(the same import as ``POST /api/v1/skills/import``) and ``.selectors``."""

from __future__ import annotations

from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET, require_http_methods

from base.decorators import project_view
from base.errors import DomainError
from base.models import Role
from base.requests import ProjectRequest
from skills.skillmd import selectors
from skills.skillmd import services as skillmd
from skills.skillmd.forms import IMPORT_ID, SkillImportForm, new_import_id

TEMPLATE = "skills/import.html"
# How often the page asks for the progress of an import under way.
POLL_SECONDS = 1


def _progress_context(request: ProjectRequest, import_id: str) -> dict[str, object]:
    progress = selectors.import_progress(request.project, import_id)
    percent = 0
    if progress and progress["total"]:
        percent = round(100 * progress["done"] / progress["total"])
    return {
        "import_id": import_id,
        "progress": progress,
        "percent": percent,
        "poll_seconds": POLL_SECONDS,
    }


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def skill_import(request: ProjectRequest) -> HttpResponse:
    # Each upload gets a fresh id; the page polls its progress while the upload imports.
    context: dict[str, object] = {"next_import_id": new_import_id(), "poll_seconds": POLL_SECONDS}
    if request.method == "GET":
        context["form"] = SkillImportForm(initial={"import_id": context["next_import_id"]})
        return render(request, TEMPLATE, context)
    form = SkillImportForm(request.POST, request.FILES)
    report, error, status = None, "", 422
    if form.is_valid():
        import_id = form.cleaned_data["import_id"]
        try:
            report = skillmd.library_import_tracked(
                project=request.project,
                import_id=import_id,
                entries=skillmd.read_zip(form.cleaned_data["file"].read()),
                all_or_nothing=form.cleaned_data["all_or_nothing"],
                actor=request.user,
            )
        except skillmd.ImportRefused as refused:
            report, error = refused.report, str(refused)
        except DomainError as exc:
            form.add_error("file" if exc.field in ("file", "files") else None, str(exc))
        else:
            if report.count("created") or report.count("unchanged"):
                status = 200
            else:
                error = "No skill could be imported."
        context.update(_progress_context(request, import_id))
    context.update(form=form, report=report, error=error)
    if report is not None:
        context.update(created=report.count("created"), unchanged=report.count("unchanged"))
    template = TEMPLATE + "#result" if request.htmx else TEMPLATE
    return render(request, template, context, status=status)


@require_GET
@project_view(role=Role.ADMIN)
def skill_import_progress(request: ProjectRequest, import_id: str) -> HttpResponse:
    if not _valid_id(import_id):
        raise Http404("No such import.")
    return render(request, "skills/_import_progress.html", _progress_context(request, import_id))


def _valid_id(import_id: str) -> bool:
    return bool(IMPORT_ID.regex.match(import_id))
