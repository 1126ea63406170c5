"""A bounded schemathesis run against the OpenAPI of the real `mnist-deploy serve` process (issue 9).

Cases are generated from the served /openapi.json, valid and invalid (positive and negative
generation), and sent over loopback. Every answer must be below 500; every 4xx must be JSON with a
``detail`` (``error`` on the v2 routes). Bounded: a fixed number of examples per mode, derandomised, no Hypothesis database.
"""

from __future__ import annotations

import pytest
from _serving import serve_process

pytestmark = pytest.mark.integration

EXAMPLES_PER_MODE = 120


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(served, mode):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    with serve_process(served, "--log-level", "warning") as (url, proc):
        schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=10)
        strategy = schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
        seen: dict[int, int] = {}

        @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case) -> None:
            r = case.call(base_url=url, timeout=10)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (case.method, case.path, r.status_code, r.text[:300])
            if r.status_code >= 400:
                ctype = r.headers.get("content-type") or [""]  # schemathesis: header -> list of values
                assert ctype[0].startswith("application/json"), r.headers
                assert {"detail", "error"} & set(r.json())  # ours: detail; the v2 routes: error

        check()
        log = proc.log_path.read_text()
    assert sum(seen.values()) >= EXAMPLES_PER_MODE // 2, seen
    assert "Traceback" not in log, log
