"""Shared fixtures. Integration tests use the real MNIST files from $MNIST_DEPLOY_DATA."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist"


def pytest_configure(config):
    # A runner started in the background without job control (`bash .ci/run &` from a script) starts
    # with SIGINT ignored, and a child inherits an ignored signal through exec, so the tests that stop
    # `train` with SIGINT (Ctrl-C) would see it ignored. A handled signal is reset to the default in a
    # child, so handling it here gives every child process the usual Ctrl-C.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST folder: $MNIST_DEPLOY_DATA, else ../shared/data/mnist beside the repo."""
    path = Path(os.environ.get("MNIST_DEPLOY_DATA") or DEFAULT_DATA)
    if not any(path.glob("t10k-images-idx3-ubyte*")) and not any(path.glob("MNIST/raw/t10k-images*")):
        pytest.skip(f"real MNIST not found at {path}; set MNIST_DEPLOY_DATA")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One preprocessed-tensor cache for the whole session (kept out of the user's home)."""
    return tmp_path_factory.mktemp("mnist-cache")


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch, tmp_path_factory):
    # Tests never write into ~/.cache; each session gets its own cache unless a test overrides it.
    monkeypatch.setenv("MNIST_DEPLOY_CACHE", str(tmp_path_factory.getbasetemp() / "env-cache"))


def _train(out: Path, mnist_dir: Path, cache_dir: Path, **overrides) -> Path:
    from mnist_deploy.train.loop import TrainConfig, train

    train(TrainConfig(**overrides), data_dir=mnist_dir, cache_dir=cache_dir, out=out, allow_download=False)
    return out


@pytest.fixture(scope="session")
def trained_mlp(tmp_path_factory, mnist_dir, cache_dir) -> Path:
    """An artifacts folder with the MLP trained as by default (5 epochs, ~3 s). Treat as read-only:
    copy it with ``copy_artifacts`` before changing anything in it."""
    return _train(tmp_path_factory.mktemp("mlp-artifacts"), mnist_dir, cache_dir)


@pytest.fixture(scope="session")
def trained_cnn(tmp_path_factory, mnist_dir, cache_dir) -> Path:
    """An artifacts folder with the CNN trained as by default (5 epochs on all 60,000 images, ~40 s on
    2 cores), so export tests prove parity on the model users get. Read-only, as above."""
    return _train(tmp_path_factory.mktemp("cnn-artifacts"), mnist_dir, cache_dir, model="cnn")


@pytest.fixture(scope="session")
def served(trained_mlp, tmp_path_factory, mnist_dir, cache_dir) -> Path:
    """The trained MLP with an ONNX export, made once per session by the real exporter (read-only;
    copy it before changing anything). The predict, serve, v2, batching, workers and fuzz tests use it."""
    from _serving import onnx_artifacts

    return onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("served"), mnist_dir, cache_dir)


@pytest.fixture(scope="session")
def model(served):
    """``served``'s ONNX export loaded as ``predict`` and ``serve`` load it (``load_model``), once per
    session. The predict, serve and hardening tests share it; nothing may change it."""
    from mnist_deploy.predict import load_model

    return load_model(artifacts=served, runtime="onnx")


@pytest.fixture(scope="session")
def quick_cnn(tmp_path_factory, mnist_dir, cache_dir) -> Path:
    """An artifacts folder with the CNN trained briefly (1 epoch on 5,000 images, seconds): for
    tests about the CNN's shape and plumbing, not its accuracy, so that ``-m "not slow"`` trains no
    full CNN. Read-only, as above."""
    return _train(tmp_path_factory.mktemp("quick-cnn-artifacts"), mnist_dir, cache_dir, model="cnn", epochs=1,
                  subset=5_000)


@pytest.fixture(scope="session")
def exported_mlp(trained_mlp, tmp_path_factory, mnist_dir, cache_dir):
    """The trained MLP with every exportable format exported by the real exporter, each with the full
    parity gate (all 10,000 test images at batch sizes 1 and 10,000): this is the suite's full parity
    run per format. Returns ``(folder, report)``. Read-only: copy it before changing anything."""
    from mnist_deploy.export.run import export_artifacts

    folder = tmp_path_factory.mktemp("exported-mlp") / "artifacts"
    shutil.copytree(trained_mlp, folder)
    report = export_artifacts(artifacts=folder, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    return folder, report


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A real HTTP server on loopback serving a folder as the MNIST download mirror; yields the folder."""
    import functools
    import http.server
    import threading

    from mnist_deploy.data import mnist as data

    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data, "MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
    yield root
    server.shutdown()
    server.server_close()


@pytest.fixture
def copy_artifacts(tmp_path):
    """``copy_artifacts(src)`` -> a private copy of an artifacts folder under this test's tmp_path."""

    def _copy(src: Path, name: str = "artifacts") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture
def require_system_tool():
    """``require_system_tool(name, what)`` -> the tool's path; skips when it is missing, or fails where
    CI demands the system tools (MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS=1, set by .ci/run, which installs them)."""

    def _require(name: str, what: str) -> str:
        found = shutil.which(name)
        if found:
            return found
        msg = f"{what} ({name}) is not installed (bash scripts/system_deps.sh installs it)"
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(msg)
        pytest.skip(msg)

    return _require
