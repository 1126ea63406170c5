"""Helpers shared by the predict / serve / browser / load tests (not a test module).

``onnx_artifacts`` turns the session's trained MLP into an artifacts folder with an ONNX export
(made once per session by the real exporter, parity gate included); ``serve_process`` runs the real
``mnist-deploy serve`` on a free loopback port, with the context manager benchmarks/load_test.py uses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_EXPORTED: dict[Path, Path] = {}


def onnx_artifacts(trained: Path, tmp_root: Path, mnist_dir: Path, cache_dir: Path) -> Path:
    """A copy of ``trained`` with an ONNX artifact exported into it (once per session and source)."""
    if trained not in _EXPORTED:
        from mnist_deploy.export.run import export_artifacts

        dst = tmp_root / "served"
        shutil.copytree(trained, dst)
        # 1,000 test images: the full 10,000-image parity run per format is conftest's exported_mlp
        report = export_artifacts(artifacts=dst, formats=["onnx"], parity_images=1000, data_dir=mnist_dir,
                                  cache_dir=cache_dir, allow_download=False)
        assert report.ok, report
        _EXPORTED[trained] = dst
    return _EXPORTED[trained]


def mnist_test_digits(mnist_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist_deploy.data.mnist import load_raw

    raw = load_raw(mnist_dir, allow_download=False)
    return raw.arrays["test-images"][:n], raw.arrays["test-labels"][:n]


def png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array: (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "PNG")
    return buf.getvalue()


def _benchmark(name: str):
    """A script in benchmarks/ as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_load_test = _benchmark("load_test")


@contextlib.contextmanager
def serve_process(artifacts: Path, *args: str, log_path: Path | None = None,
                  timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``mnist-deploy serve`` (the real CLI, as a process) and yield (base URL, process) once healthy.

    The server's output stays in ``log_path`` (``proc.log_path``; default ``serve-PORT.log`` beside the
    artifacts), and a server that exits or never gets healthy fails the test with that output.
    """
    if "--workers" not in args:  # the server defaults to every core; these tests are about one process
        args = ("--workers", "1", *args)
    port = _load_test.free_port()
    log_path = log_path or Path(artifacts).parent / f"serve-{port}.log"
    try:
        with _load_test.serve_subprocess(artifacts, args, port=port, log_path=log_path, startup_timeout=timeout,
                                         stop_timeout=15) as (url, proc):
            proc.log_path = log_path
            yield url, proc
    except _load_test.ServerError as exc:  # raised only while starting, before the yield
        raise AssertionError(f"serve {exc.problem}:\n{exc.log}") from None


def wait_ready(client, timeout: float = 10.0):
    """Poll ``GET /health`` on ``client`` (a TestClient or an httpx.Client with a base URL) until it is 200:
    after startup, readiness waits for the model's warm-up, which runs in the background. Returns the answer."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/health")
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.01)
