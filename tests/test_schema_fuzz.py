"""Property-based tests generated from the service's own OpenAPI schema (schemathesis), run in-process (ASGI)
against a tiny export: whatever schemathesis sends — valid and invalid query parameters, multipart bodies with
arbitrary bytes in `files`, missing fields — the answer is never a 5xx, its status code is one the schema
declares, and its content type, headers and body match the schema.

The examples are bounded (MAX_EXAMPLES per operation) so the run takes seconds once the export is built; CI
runs it with the other tests.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from chestct.serving.app import create_app

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


# The schema does not depend on the model, so it is read from an app that is never started: collection stays
# cheap. (schemathesis.pytest.from_fixture would load it from a fixture, but it breaks on pytest 9.)
schema = schemathesis.openapi.from_dict(create_app().openapi())


@pytest.fixture(scope="module")
def service(tiny_export):
    """The app the cases are sent to (in-process, through ASGI); schemathesis runs its lifespan."""
    return create_app(tiny_export)


@schema.parametrize()
# derandomize: CI sends the same cases every run, so a failure reproduces; database=None: none is stored either.
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
def test_every_answer_matches_the_schema_and_none_is_a_server_error(case, service):
    case.call_and_validate(app=service, checks=CHECKS)
