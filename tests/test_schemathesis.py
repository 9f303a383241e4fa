"""Schemathesis over the whole OpenAPI document, against the production ASGI application (the
fast lane in front of Django) under uvicorn, with a key of every scope: no request a client can
make, valid by the schema or not, gets a server error or an answer the schema does not declare.

Bounded for CI (about 40 seconds): ``SCHEMATHESIS_MAX_EXAMPLES`` examples an operation and
generation mode (positive and negative; 10 by default, derandomized so that CI runs the same
cases), each with the next scope's key in turn (ingest, runtime, admin). Raise it for a deeper
hunt: ``SCHEMATHESIS_MAX_EXAMPLES=200 pytest tests/test_schemathesis.py -s``."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import requests
import schemathesis
from django.core.management import call_command
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from metaclaw_site.api import api
from tests import factories
from tests.asgi_server import asgi_server

# The database is set up for marked tests; each one's own transaction is not what the server's
# threads see: ``keys`` commits what they need.
pytestmark = pytest.mark.django_db

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
SCOPES = (["ingest"], ["runtime"], ["ingest", "runtime", "admin"])

schema = schemathesis.openapi.from_dict(api.get_openapi_schema(path_prefix="/api/v1"))
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    # Unknown query parameters are ignored, as most APIs do: not a negative case.
    allow_extra_parameters=False,
)

# What the run sent and got, printed when the module ends.
SENT: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server_url(django_db_setup):
    """The production ASGI application (``metaclaw_site.asgi``) under uvicorn."""
    with asgi_server() as url:
        yield url


@pytest.fixture(scope="module")
def keys(django_db_setup, django_db_blocker):
    """A key of each scope, committed for the server's threads. One project for the whole run,
    the database emptied once at its end (per test, as transactional tests do, it cost more
    than the requests)."""
    with django_db_blocker.unblock():
        project = factories.make_project()
        yield [factories.make_key(project, scopes=scopes) for scopes in SCOPES]
        call_command("flush", interactive=False, verbosity=0)
    # The run's figures (pytest -s shows them): requests sent, answers by class.
    print(f"\nschemathesis: {dict(SENT)}")


@pytest.fixture(scope="module")
def session():
    with requests.Session() as http:
        yield http


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_operation_answers_as_the_schema_says(case, server_url, keys, session):
    # Each example goes with the next scope's key: every operation meets every scope.
    key = keys[SENT["requests"] % len(keys)]
    response = case.call(
        base_url=server_url,
        session=session,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    SENT["requests"] += 1
    SENT[f"{response.status_code // 100}xx"] += 1
    case.validate_response(response, checks=CHECKS)
