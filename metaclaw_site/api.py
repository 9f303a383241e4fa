"""The single NinjaAPI: every app's router is mounted here (the composition root)."""

from __future__ import annotations

import sys
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser

from base.api_shapes import (
    NOT_AN_OBJECT,
    BodyNotAnObject,
    declare_errors,
    domain_error_answer,
    invalid_body,
    parse_json_object,
    validation_errors,
)
from base.auth import RateLimited, ScopeDenied
from base.errors import DomainError


class FastJsonParser(Parser):
    """orjson first, Python's parser (NaN, Infinity) when orjson refuses: ``parse_json``."""

    def parse_body(self, request: HttpRequest) -> Any:
        return parse_json_object(request.body)


class MetaClawAPI(NinjaAPI):
    def get_openapi_operation_id(self, operation: Any) -> str:
        """Operation ids are part of the API (generated clients name their methods after them)
        and ninja makes them from the handler's module path. A router module that moved keeps
        the ids it had by declaring their prefix as ``OPENAPI_OPERATION_PREFIX``."""
        module = sys.modules[operation.view_func.__module__]
        prefix = getattr(module, "OPENAPI_OPERATION_PREFIX", None)
        if prefix is None:
            return super().get_openapi_operation_id(operation)
        return f"{prefix}_{operation.view_func.__name__}"

    def get_openapi_schema(self, **kwargs: Any) -> Any:
        """The document, with the errors every operation may answer and their one shape."""
        return declare_errors(super().get_openapi_schema(**kwargs))


api = MetaClawAPI(
    parser=FastJsonParser(),
    title="MetaClaw API",
    version="1",
    description=(
        "Agents report failures and turns; MetaClaw turns them into reviewed skills and LoRA "
        "adapters, served as versioned policies. Authenticate with `Authorization: Bearer <key>`."
    ),
    urls_namespace="api",
)


@api.exception_handler(ValidationError)
def on_validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    return api.create_response(
        request,
        invalid_body(validation_errors(exc.errors)),
        status=422,
    )


@api.exception_handler(AuthenticationError)
def on_auth_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = api.create_response(
        request,
        {
            "detail": "A valid API key is required (Authorization: Bearer <key>).",
            "code": "unauthorized",
        },
        status=401,
    )
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(ScopeDenied)
def on_scope_denied(request: HttpRequest, exc: ScopeDenied) -> HttpResponse:
    return api.create_response(request, {"detail": str(exc), "code": "forbidden"}, status=403)


@api.exception_handler(RateLimited)
def on_rate_limited(request: HttpRequest, exc: RateLimited) -> HttpResponse:
    response = api.create_response(
        request,
        {"detail": str(exc), "code": "rate_limited", "retry_after": exc.retry_after},
        status=429,
    )
    response["Retry-After"] = str(exc.retry_after)
    return response


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return api.create_response(
        request, {"detail": "Request body too large.", "code": "payload_too_large"}, status=413
    )


@api.exception_handler(DomainError)
def on_domain_error(request: HttpRequest, exc: DomainError) -> HttpResponse:
    status, body = domain_error_answer(exc)
    return api.create_response(request, body, status=status)


@api.exception_handler(Http404)
def on_not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return api.create_response(request, {"detail": "Not found.", "code": "not_found"}, status=404)


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if isinstance(exc.__cause__, BodyNotAnObject):  # raised by FastJsonParser, wrapped by ninja
        return api.create_response(request, invalid_body(NOT_AN_OBJECT), status=422)
    return api.create_response(
        request, {"detail": str(exc), "code": "error"}, status=exc.status_code
    )


def _mount_routers() -> None:
    from incidents.api import router as incidents_router
    from incidents.traffic_api import router as traffic_router
    from incidents.turns_api import router as turns_router
    from skills.canary.api import router as canary_router
    from skills.effectiveness.api import router as effectiveness_router
    from skills.gate.api import router as gate_router
    from skills.runtime.api import router as runtime_router
    from skills.skillmd.api import router as skillmd_router
    from skills.synthesis.api import router as synthesis_router
    from skills.versions.api import router as versions_router
    from training.policy.api import router as training_settings_router
    from training.runs.api import router as training_router

    # In this order: it is the order of the operations in the OpenAPI document.
    for router in (
        incidents_router,
        turns_router,
        traffic_router,
        versions_router,
        runtime_router,
        skillmd_router,
        synthesis_router,
        effectiveness_router,
        gate_router,
        canary_router,
        training_router,
        training_settings_router,
    ):
        api.add_router("/", router)


_mount_routers()
