"""Property-based fuzzing of the API: schemathesis generates requests from the server's own OpenAPI
schema, valid ones and (negative mode) ones that break it in every field, and no reply may be a
5xx.  Every non-2xx reply must carry OpenAI's error body."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import glimpse
from glimpse.serve import ServerLimits, create_app


@pytest.fixture(scope="module")
def api_schema(tiny_vlm_run):
    app = create_app(glimpse.load(tiny_vlm_run), "tiny-vlm", ServerLimits(max_image_pixels=100_000))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE], deterministic=True)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_5xx(case):
    response = case.call()
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
