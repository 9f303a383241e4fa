"""Training settings endpoints (admin keys): read and change the backend, base model,
hyperparameters, budgets and idle windows. The same service as the dashboard's settings page,
so the same validation (422 naming the field) and the same audit event."""

from __future__ import annotations

from typing import Any

from ninja import Router

from base.auth import admin_auth
from base.permissions import api_key_label
from base.requests import ApiRequest
from training.policy import services
from training.policy.schemas import TrainingSettingsIn, TrainingSettingsOut, TrainingSettingsPatch

# The training API's operation ids: training_api_<handler> (see metaclaw_site.api).
OPENAPI_OPERATION_PREFIX = "training_api"

router = Router(tags=["training"])


def _answer(request: ApiRequest, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    project = request.project
    if changes is None:
        policy = services.idle_policy_get(project)
    else:
        policy = services.idle_policy_update(
            project=project, actor=None, actor_label=api_key_label(request.api_key), **changes
        )
    # Defaults that nobody saved yet were never updated.
    updated_at = policy.updated_at if policy.pk else None
    return {**services.idle_policy_settings(policy), "updated_at": updated_at}


@router.get(
    "/training/settings", auth=admin_auth, response=TrainingSettingsOut, summary="Read settings"
)
def get_settings(request: ApiRequest):
    """The project's training settings (defaults until someone saves them)."""
    return _answer(request)


@router.put(
    "/training/settings",
    auth=admin_auth,
    response=TrainingSettingsOut,
    summary="Replace settings",
)
def replace_settings(request: ApiRequest, payload: TrainingSettingsIn):
    """Every setting at once (GET's answer is a valid body)."""
    return _answer(request, payload.dict())


@router.patch(
    "/training/settings",
    auth=admin_auth,
    response=TrainingSettingsOut,
    summary="Change some settings",
)
def update_settings(request: ApiRequest, payload: TrainingSettingsPatch):  # type: ignore[valid-type]
    """Only the settings in the body change."""
    return _answer(request, payload.dict(exclude_unset=True))
