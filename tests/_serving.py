"""Helpers shared by the predict / serve / browser / load tests (not a test module).

``onnx_artifacts`` turns the session's trained MLP into an artifacts folder with an ONNX export
(made once per session by the real exporter, parity gate included); ``serve_process`` runs the real
``mnist-deploy serve`` on a free loopback port.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

_EXPORTED: dict[Path, Path] = {}


def onnx_artifacts(trained: Path, tmp_root: Path, mnist_dir: Path, cache_dir: Path) -> Path:
    """A copy of ``trained`` with an ONNX artifact exported into it (once per session and source)."""
    if trained not in _EXPORTED:
        from mnist_deploy.export import export_artifacts

        dst = tmp_root / "served"
        shutil.copytree(trained, dst)
        report = export_artifacts(artifacts=dst, formats=["onnx"], data_dir=mnist_dir, cache_dir=cache_dir,
                                  allow_download=False)
        assert report.ok, report
        _EXPORTED[trained] = dst
    return _EXPORTED[trained]


def mnist_test_digits(mnist_dir: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist_deploy.data import load_raw

    raw = load_raw(mnist_dir, allow_download=False)
    return raw.arrays["test-images"][:n], raw.arrays["test-labels"][:n]


def png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array: (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(artifacts: Path, *args: str, log_path: Path | None = None,
                  timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``mnist-deploy serve`` (the real CLI, as a process) and yield (base URL, process) once healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "mnist_deploy", "serve", "--artifacts", str(artifacts), "--port", str(port), *args]
    log_path = log_path or Path(artifacts).parent / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"serve not healthy after {timeout:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        proc.log_path = log_path
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
