"""The server against its own OpenAPI schema: schemathesis generates requests for every operation,
valid and invalid (wrong types, missing fields, out-of-range numbers), sends them through the ASGI
transport and runs all its checks on every response: status codes, bodies, content types and headers
as documented, invalid data rejected, valid data accepted, and never a 5xx."""
from __future__ import annotations

import pytest

from tests.conftest import require_module

schemathesis = require_module("schemathesis", "the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the import check)

from deepmetric.serve import create_app  # noqa: E402

# A valid upload is "any bytes" to a schema (format: binary); that they must also decode as an image
# is what OpenAPI cannot say, so for schema-valid data the documented image errors count as accepted.
CONFIG = {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "413", "415"]}}}
EXAMPLES = 25  # per operation and mode: about 20 s in all on a 2-core machine


@pytest.fixture(scope="module")
def api_schema(predictor_and_index):
    predictor, index = predictor_and_index
    app = create_app(predictor, index, max_upload_mb=0.05, max_top_k=20)
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(CONFIG))


def operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_lists_every_route(api_schema):
    assert sorted(op.label for op in operations(api_schema)) == [
        "GET /health", "GET /images/{item_id}", "POST /embed", "POST /search"]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_response_matches_the_schema(api_schema, mode):
    generation_mode = schemathesis.GenerationMode(mode)
    for operation in operations(api_schema):
        raw = operation.definition.raw
        if mode == "negative" and not (raw.get("parameters") or raw.get("requestBody")):
            continue  # GET /health takes nothing: there is no invalid request to make
        @given(case=operation.as_strategy(generation_mode=generation_mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate()

        check()
