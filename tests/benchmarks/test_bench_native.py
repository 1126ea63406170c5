"""benchmarks/bench_native.py for the Node row: one tiny real run of the bench's onnxruntime-node row against
the Node runner's bare loop in a fresh process. The fidelity target is the benchmark's business; nothing
here asserts a time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from _serving import REPO

from mnist_deploy.formats import js_node

pytestmark = [pytest.mark.node, pytest.mark.integration]


def test_bench_native_compares_the_node_row_with_a_bare_node_loop(served, tmp_path, mnist_dir, cache_dir):
    from mnist_deploy.export.run import export_artifacts

    reason = js_node.unavailable()
    if reason:
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path / "artifacts"
    shutil.copytree(served, folder)
    report = export_artifacts(artifacts=folder, formats=["onnx-node"], parity_images=500, data_dir=mnist_dir,
                              cache_dir=cache_dir, allow_download=False)
    assert report.ok, [r.error for r in report.failures]
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_native.py"), "--artifacts", str(folder),
                          "--data-dir", str(mnist_dir), "--runtimes", "onnxruntime-node", "--threads", "1",
                          "--warmup", "2", "--min-time", "0.02", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("onnxruntime-node")
    assert lines[start + 1].split()[:3] == ["repeat", "bench", "p50"]
    rows = [ln.split() for ln in lines[start + 2:start + 4]]
    assert [r[0] for r in rows] == ["1", "2"] and all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)
    assert lines[start + 4].startswith("median") and lines[start + 5].startswith("target: bench p50 within 10%")
