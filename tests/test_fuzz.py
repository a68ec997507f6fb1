"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis + hypothesis), against
the real server: no 5xx, and every answer is one the document declares (status, content type, body schema).

Bounded: a fixed number of examples per mode (~10 s in all here), derandomized, no example database.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize(("mode", "examples"), [("positive", 150), ("negative", 150)])
def test_openapi_fuzz_no_5xx_and_only_documented_answers(server, mode, examples):
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    strategy = schema.as_strategy(generation_mode=GenerationMode(mode))
    seen: dict[int, int] = {}

    with requests.Session() as session:  # one keep-alive connection: an error must not break the next request

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run: a failure reproduces
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(case=strategy)
        def run(case) -> None:
            response = case.call(base_url=server.url, session=session)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=CHECKS)

        run()
    assert all(code < 500 for code in seen), seen
    assert sum(seen.values()) >= examples // 2, seen
