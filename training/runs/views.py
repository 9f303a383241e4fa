"""Training pages: runs with live progress (a small polled region: steps, loss, tokens/s, time
left and the loss chart), the dataset report, the evaluation, actions, and the idle-window
settings. Thin: selectors for reads, services for writes."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from base.decorators import project_view
from base.errors import DomainError, NotFound
from base.models import Role
from base.partials import render_page
from base.requests import ProjectRequest
from training.policy import services as policy_services
from training.policy.forms import IdlePolicyForm
from training.policy.selectors import auto_training_on
from training.runs import selectors
from training.runs import services as run_services
from training.runs.models import PauseReason, TrainingRun

RECENT_RUNS = 20
POLL_SECONDS = 2


def _is_admin(request: ProjectRequest) -> bool:
    return request.membership.has_role(Role.ADMIN)


def _home_context(request: ProjectRequest) -> dict[str, Any]:
    project = request.project
    # Polled every 2 s while a run is in flight: the table needs none of the per-step data.
    runs = list(
        selectors.runs_for_project(project).defer(
            "metrics", "log", "sample_answers", "outcomes", "search"
        )[:RECENT_RUNS]
    )
    policy = policy_services.idle_policy_get(project)
    return {
        "runs": runs,
        "polling": any(run.is_active for run in runs),
        "poll_seconds": POLL_SECONDS,
        "idle_status": policy_services.project_idle_status(project=project, policy=policy),
        "readiness": run_services.project_training_readiness(project=project, policy=policy),
        "policy": policy,
        "auto_training": auto_training_on(policy),
        "can_act": _is_admin(request),
    }


@require_GET
@project_view()
def training_home(request: ProjectRequest) -> HttpResponse:
    return render_page(request, "training/home.html", "runs", _home_context(request))


# The chart keeps at most this many points: a 10,000-step run would otherwise send 10,000 on
# every poll.
CHART_POINTS = 200


def loss_chart(
    losses: list[tuple[int, float]], width: int = 640, height: int = 180
) -> dict[str, Any] | None:
    """Geometry of an inline SVG line chart of the loss per step (None with under two points).
    Long runs are thinned to ``CHART_POINTS`` evenly spaced steps, the last one always kept."""
    points = losses
    if len(points) > CHART_POINTS:
        stride = -(-len(points) // CHART_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    if len(points) < 2:
        return None
    pad_left, pad_right, pad_top, pad_bottom = 44, 10, 10, 22
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    first, last = min(steps), max(steps)
    step_span = (last - first) or 1
    inner_w = width - pad_left - pad_right
    inner_h = height - pad_top - pad_bottom

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = pad_left + (step - first) / step_span * inner_w
        y = pad_top + (hi - loss) / span * inner_h
        return round(x, 1), round(y, 1)

    coords = [xy(s, v) for s, v in points]
    return {
        "width": width,
        "height": height,
        "points": " ".join(f"{x},{y}" for x, y in coords),
        "dots": coords if len(coords) <= 60 else [],
        "hi": hi,
        "lo": lo,
        "first_step": first,
        "last_step": last,
        "x0": pad_left,
        "x1": width - pad_right,
        "y0": pad_top,
        "y1": height - pad_bottom,
        "last": values[-1],
    }


def _progress_context(run: TrainingRun) -> dict[str, Any]:
    progress = selectors.run_progress(run)
    return {
        "run": run,
        "progress": progress,
        "chart": loss_chart(progress.losses),
        "poll_seconds": POLL_SECONDS,
    }


def _run_context(request: ProjectRequest, run_id: int) -> dict[str, Any]:
    project = request.project
    try:
        run = selectors.run_for_project(project, run_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    report = run.dataset.report if run.dataset_id and run.dataset else {}
    before = (run.eval_before or {}).get("loss")
    after = (run.eval_after or {}).get("loss")
    return {
        **_progress_context(run),
        "report": report,
        "dropped": sorted((report.get("dropped") or {}).items()),
        "eval_before": before,
        "eval_after": after,
        "eval_change": (after - before) / before * 100 if before and after is not None else None,
        "can_act": _is_admin(request),
        "pause_reasons": dict(PauseReason.choices),
    }


@require_GET
@project_view()
def run_detail(request: ProjectRequest, run_id: int) -> HttpResponse:
    return render_page(request, "training/run_detail.html", "live", _run_context(request, run_id))


@require_GET
@project_view()
def run_progress(request: ProjectRequest, run_id: int) -> HttpResponse:
    """The run page's progress region, polled every 2 s while the run moves: one narrow row
    read (no dataset, no log), a few KB of HTML. ``seen`` is the status the page was drawn
    with: once the run has left it, everything else on the page (actions, evaluation, dataset)
    changed too, so htmx reloads the page once instead of this region alone."""
    try:
        run = selectors.run_progress_for_project(request.project, run_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    response = render(request, "training/_run_progress.html", _progress_context(run))
    seen = request.GET.get("seen")
    if request.htmx and seen and seen != run.status:
        response["HX-Refresh"] = "true"
    return response


@require_POST
@project_view(role=Role.ADMIN)
def run_create(request: ProjectRequest) -> HttpResponse:
    project = request.project
    try:
        run = run_services.training_run_create(project=project, actor=request.user)
    except DomainError as exc:
        messages.error(request, str(exc))
        if request.htmx:
            return render(request, "training/home.html#runs", _home_context(request), status=409)
        return redirect("training:home", project_slug=project.slug)
    messages.success(request, f"Training run #{run.pk} queued.")
    if request.htmx:
        return render(request, "training/home.html#runs", _home_context(request))
    return redirect("training:run_detail", project_slug=project.slug, run_id=run.pk)


_ACTIONS = {
    "pause": run_services.training_run_request_pause,
    "resume": run_services.training_run_resume,
    "cancel": run_services.training_run_cancel,
}


@require_POST
@project_view(role=Role.ADMIN)
def run_action(request: ProjectRequest, run_id: int, action: str) -> HttpResponse:
    project = request.project
    service = _ACTIONS.get(action)
    if service is None:
        raise Http404("No such action.")
    try:
        run = selectors.run_for_project(project, run_id)
    except NotFound as exc:
        raise Http404(str(exc)) from exc
    status = 200
    try:
        service(run=run, actor=request.user)
        messages.success(request, f"Run #{run.pk}: {action} done.")
    except DomainError as exc:
        messages.error(request, str(exc))
        status = 409
    if request.htmx:
        return render(
            request, "training/run_detail.html#live", _run_context(request, run_id), status=status
        )
    return redirect("training:run_detail", project_slug=project.slug, run_id=run.pk)


@require_http_methods(["GET", "POST"])
@project_view(role=Role.ADMIN)
def training_settings(request: ProjectRequest) -> HttpResponse:
    project = request.project
    policy = policy_services.idle_policy_get(project)
    status = 200
    if request.method == "POST":
        form = IdlePolicyForm(request.POST)
        if form.is_valid():
            try:
                policy_services.idle_policy_update(
                    project=project, actor=request.user, **form.cleaned_data
                )
            except DomainError as exc:
                form.add_error(exc.field if exc.field in form.fields else None, str(exc))
            else:
                messages.success(request, "Training settings saved.")
                return redirect("training:settings", project_slug=project.slug)
        status = 422
    else:
        form = IdlePolicyForm.for_policy(policy)
    context = {
        "form": form,
        "policy": policy,
        "auto_training": auto_training_on(policy),
        "idle_status": policy_services.project_idle_status(project=project, policy=policy),
    }
    return render(request, "training/settings.html", context, status=status)
