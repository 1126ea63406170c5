"""Load test: Apache Bench against the real `mnist-deploy serve` process on loopback.

5,000 JSON pixel requests from 16 concurrent clients must all succeed. The figures (requests per
second, p50/p99) are printed, not asserted: the latency target lives in benchmarks/load_test.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _serving import onnx_artifacts

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,

]


@pytest.fixture(autouse=True)
def _need_ab(require_system_tool):
    require_system_tool("ab", "Apache Bench from apache2-utils")


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", REPO / "benchmarks" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_5000_json_requests_at_16_concurrent_clients_all_succeed(trained_mlp, tmp_path_factory, mnist_dir, cache_dir):
    folder = onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("load"), mnist_dir, cache_dir)
    lt = _load_test_module()
    r = lt.load_test(artifacts=folder, requests=5000, concurrency=16, data_dir=mnist_dir)
    print()
    lt._print(r)
    assert r["complete"] == 5000
    assert r["failed"] == 0 and r["non_2xx"] == 0
    assert r["server_200"] == 5000  # the server's own count agrees: every request was a 200
