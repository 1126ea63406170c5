"""The C++ runner (``native/runner.cpp``): built with CMake against the installed torch's libtorch on first
use, cached, and driven as a persistent subprocess by :class:`NativePredictor`.

The build lands in ``$MNIST_DEPLOY_NATIVE_CACHE``, else ``$MNIST_DEPLOY_CACHE/native``, else
``~/.cache/mnist-deploy/native``, in a folder named by the sha256 of the runner's sources, the torch
version and the platform, so a build happens once per source and torch and never again; a build
that fails is one line naming the compiler's first error (and is not retried in the same process).

The protocol is the framed one documented at the top of ``runner.cpp``, driven by :mod:`.framed`
(shared with the Node runner): one process per loaded model, so the parity gate's 10,000 batch-1
calls are 10,000 round trips through a pipe, not 10,000 process starts. The runner also times its
own calls (``time_calls``), which the bench uses instead of timing the pipe.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..errors import MnistDeployError, RuntimeUnavailable
from .framed import FramedPredictor, RunnerError

SOURCE_ENV = "MNIST_DEPLOY_NATIVE_SRC"  # a folder with CMakeLists.txt and runner.cpp (default: native/)
CACHE_ENV = "MNIST_DEPLOY_NATIVE_CACHE"
SOURCES = ("CMakeLists.txt", "runner.cpp")
RUNNER = "mnist_runner"
BUILD_TIMEOUT_S = 1800

_lock = threading.Lock()
_built: dict[str, Path | NativeBuildError] = {}  # cache key -> runner, or the failure (never retried in-process)


class NativeBuildError(MnistDeployError):
    """The C++ runner could not be built (the message is the compiler's or CMake's first error)."""

    exit_code = 1


class NativeError(RunnerError):
    """The C++ runner refused a request or died."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Where things are, and whether a build can happen here.


def source_dir() -> Path:
    env = os.environ.get(SOURCE_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "native"


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("MNIST_DEPLOY_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mnist-deploy") / "native"


def cxx_compiler() -> str | None:
    """The C++ compiler CMake will use: ``$CXX`` if set (it must exist), else c++ / g++ / clang++ on PATH."""
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env)
    return next((found for c in ("c++", "g++", "clang++") if (found := shutil.which(c))), None)


def build_tools_missing() -> str | None:
    """Why the runner cannot be built here, or None."""
    if not sys.platform.startswith("linux"):
        return f"the C++ runner is built and tested on Linux only, not {sys.platform}"
    if not all((source_dir() / f).is_file() for f in SOURCES):
        return f"the runner's source is not at {source_dir()} (a source checkout has native/; or set ${SOURCE_ENV})"
    if cxx_compiler() is None:
        env = os.environ.get("CXX")
        what = f"CXX={env} is not an executable" if env else "no c++, g++ or clang++ on PATH"
        return f"no C++ compiler ({what}); run scripts/system_deps.sh or install g++"
    if shutil.which("cmake") is None:
        return "cmake is not installed; run scripts/system_deps.sh (or pip install cmake)"
    return None


def cache_key() -> str:
    """sha256 of the runner's sources and the torch it links: what a build depends on (a cached runner
    needs no compiler to run)."""
    import torch

    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (source_dir() / name).read_bytes() + b"\0")
    h.update(f"torch {torch.__version__} {Path(torch.__file__).parent}\0".encode())
    h.update(f"{sys.platform} {platform.machine()}".encode())
    return h.hexdigest()[:20]


def cached_runner() -> Path | None:
    """The runner already built for these sources, torch and compiler, if there is one."""
    if not all((source_dir() / f).is_file() for f in SOURCES):
        return None
    exe = cache_root() / f"runner-{cache_key()}" / RUNNER
    return exe if os.access(exe, os.X_OK) else None


def unavailable() -> str | None:
    """None when a runner is built or can be built here; else why not (the skipped row's reason)."""
    import torch  # noqa: F401  (the runner links the installed torch's libtorch)

    if cached_runner() is not None:
        return None
    reason = build_tools_missing()
    if reason:
        return reason
    failed = _built.get(cache_key())
    return str(failed) if isinstance(failed, NativeBuildError) else None


# ---------------------------------------------------------------------------------------------
# Building.


def ensure_runner(progress=None) -> Path:
    """The runner's path, building it first if these sources and this torch have no build yet."""
    with _lock:
        exe = cached_runner()
        if exe is not None:
            return exe
        reason = build_tools_missing()
        if reason:
            raise RuntimeUnavailable(reason)
        key = cache_key()
        previous = _built.get(key)
        if isinstance(previous, NativeBuildError):
            raise previous
        try:
            exe = _build(key, progress)
        except NativeBuildError as exc:
            _built[key] = exc
            raise
        _built[key] = exe
        return exe


def _build(key: str, progress) -> Path:
    import torch.utils

    final = cache_root() / f"runner-{key}"
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".runner-{key}-", dir=final.parent))
    try:
        if progress is not None:
            progress(f"building the C++ runner in {final} (once per torch version)")
        configure = ["cmake", "-S", str(source_dir()), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
        if os.environ.get("CXX"):
            configure.append(f"-DCMAKE_CXX_COMPILER={cxx_compiler()}")
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        _step(configure, "configuring the C++ runner (cmake)")
        _step(["cmake", "--build", str(work / "build"), "--parallel", str(os.cpu_count() or 1)],
              "building the C++ runner")
        (work / "build" / RUNNER).rename(work / RUNNER)
        shutil.rmtree(work / "build", ignore_errors=True)
        try:
            work.rename(final)
        except OSError:  # another process finished the same build first: use theirs
            if not os.access(final / RUNNER, os.X_OK):
                raise
        return final / RUNNER
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _step(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"{what} failed: {exc}") from None
    if proc.returncode != 0:
        raise NativeBuildError(f"{what} failed: {first_error(proc.stdout + proc.stderr)}")


def first_error(log: str) -> str:
    """The first line of a build log that says what went wrong (``error:``, CMake Error), trimmed."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "error:" in ln.lower() or ln.startswith("CMake Error"):
            if ln.startswith("CMake Error") and i + 1 < len(lines):
                return f"{ln} {lines[i + 1]}"[:300]
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


# ---------------------------------------------------------------------------------------------
# Running.


class NativePredictor(FramedPredictor):
    """A model loaded by the C++ runner in its own process (``torch::jit::load`` or
    ``AOTIModelPackageLoader``); calls are framed requests over its stdin/stdout (:mod:`.framed`).

    ``time_calls`` has the runner time its own loop (warm-up, then per-call steady_clock ns until
    ``min_time`` and ``min_calls``), which is what a C++ service would see; the bench uses it in
    place of timing ``run`` from Python.
    """

    what = "the C++ runner"
    error = NativeError

    def __init__(self, path: Path, kind: str, runtime: str, threads: int | None = None, note: str = "") -> None:
        exe = ensure_runner()
        self.runtime = runtime
        self.device = "cpu"
        info = self._start([str(exe), "serve", "--kind", kind, "--model", str(path), "--threads", str(threads or 0)],
                           path)
        self.details = {"precision": "f32", "threads": info.get("threads"), "runner": str(exe),
                        "timed_by": "the C++ runner (steady_clock around each call)", "note": note}


__all__ = ["NativeBuildError", "NativeError", "NativePredictor", "build_tools_missing", "cache_root",
           "cached_runner", "ensure_runner", "first_error", "source_dir", "unavailable"]
